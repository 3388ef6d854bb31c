"""Continual instruction tuning: the task builder, exact match and answer loss; the tiny continual
instruct run end to end is `slow`.

    pytest tests/test_instruct.py                  # seconds
    pytest -m slow tests/test_instruct.py          # + opmix-ray continual on continual_instruct_tiny.yaml
"""
import json
import math
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from opmix_ray.experiments.experiment_config import load_experiment_config
from opmix_ray.data import instruct
from opmix_ray.data.instruct import (
    DELIM,
    EVAL_FILE,
    MANIFEST,
    TASKS,
    build_instruct,
    ensure_built,
)
from opmix_ray.data.read import build_shards
from opmix_ray.data.shards import BUNDLED_DIR, DataError, load_tokenizer
from opmix_ray.experiments.continual import check_schedule
from opmix_ray.experiments.instruct_eval import _in_stream, load_sets, majority_em, score

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "opmix_ray", "configs")
TOK, _ = load_tokenizer(BUNDLED_DIR / "tokenizer.json")
EOS = 0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("instruct")
    return out, build_instruct(out)


def _texts(path):
    return pq.read_table(path)["text"].to_pylist()


def test_builder_is_deterministic(built, tmp_path):
    out, man = built
    again = build_instruct(tmp_path)
    assert again == man  # every sha256, count and format
    for name in [MANIFEST, EVAL_FILE, *(f"{t}.parquet" for t in TASKS)]:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_answer_spans_are_the_tail_of_each_example(built):
    out, man = built
    evals = json.loads((out / EVAL_FILE).read_text())["tasks"]
    for task, spec in TASKS.items():
        rows = _texts(out / f"{task}.parquet")
        assert len(rows) == man["tasks"][task]["n_train"] and len(set(rows)) == len(rows)
        pairs = [tuple(x) for x in evals[task]["heldout"] + evals[task]["trained_candidates"]]
        for p, a in pairs:
            assert p.startswith(spec.instruction + ": ") and p.endswith(DELIM) and a.startswith(" ")
            assert TOK.encode(p + a).ids == TOK.encode(p).ids + TOK.encode(a).ids  # the span is whole tokens
        assert {p + a for p, a in evals[task]["trained_candidates"]} <= set(rows)
        assert len(evals[task]["heldout"]) == man["tasks"][task]["n_heldout"] == 200
    pos = [a for _, a in evals["dict_pos"]["heldout"]]
    assert pos.count(" n.") == pos.count(" a.") == 100  # balanced: the majority answer scores 0.5
    assert man["tasks"]["dict_pos"]["majority_em_heldout"] == 0.5
    trained = [a for _, a in evals["dict_pos"]["trained_candidates"]]  # a uniform sample of a balanced set
    assert 0.4 < trained.count(" n.") / len(trained) < 0.6
    assert len({a for _, a in evals["bible_end"]["heldout"] + evals["bible_end"]["trained_candidates"]}) <= 40
    for p, a in evals["bible_end"]["heldout"][:50]:  # the verse is the prompt's text plus the answer
        verse = p.split(": ", 1)[1].removesuffix(DELIM) + a
        assert any(verse in d for d in _texts(BUNDLED_DIR / "bible.parquet"))
    assert all(a.strip().isalpha() for _, a in evals["py_doc"]["heldout"])


def test_heldout_examples_appear_in_no_training_data(built):
    out, man = built
    evals = json.loads((out / EVAL_FILE).read_text())["tasks"]
    for task, spec in TASKS.items():
        prompts = {r.split(DELIM)[0] for r in _texts(out / f"{task}.parquet")}
        held = [tuple(x) for x in evals[task]["heldout"]]
        assert not {p.split(DELIM)[0] for p, _ in held} & prompts
        raw = "\n".join(_texts(out / f"{spec.source}.parquet"))
        n_raw = man["raw"][spec.source]["n_docs"] + man["raw"][spec.source]["n_docs_held_out"]
        assert n_raw == len(_texts(BUNDLED_DIR / f"{spec.source}.parquet"))
        # the held-out fact itself (a headword's entry line, a whole verse) is nowhere in the raw
        # domain stage 0 pretrains on; py_doc's only give-away is a training example, checked above
        if spec.fact:
            facts = [spec.fact.format(q=p.split(": ", 1)[1].removesuffix(DELIM), a=a) for p, a in held]
            assert not [f for f in facts if f in "\n" + raw], task


def test_ensure_built_checks_hashes_and_needs_a_path(built, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="^data.path: .*fix: set data.path"):
        ensure_built(None)
    calls = []
    monkeypatch.setattr(instruct, "build_instruct", lambda root: calls.append(root) or {})
    ensure_built(str(tmp_path / "new"))
    assert calls == [tmp_path / "new"]  # built when there is no manifest
    shutil.copytree(built[0], tmp_path / "copy")
    assert ensure_built(str(tmp_path / "copy")) == built[1]
    man = json.loads((tmp_path / "copy" / MANIFEST).read_text())
    (tmp_path / "copy" / MANIFEST).write_text(json.dumps({**man, "format": "opmix-instruct/0"}))
    with pytest.raises(DataError, match=r"^data.path: .*another version .*fix: rebuild"):
        ensure_built(str(tmp_path / "copy"))
    (tmp_path / "copy" / MANIFEST).write_text(json.dumps(man))
    rows = _texts(tmp_path / "copy" / "py_doc.parquet")
    pq.write_table(pa.table({"text": rows[:-1]}), tmp_path / "copy" / "py_doc.parquet")
    with pytest.raises(DataError, match=r"^data.path: .*py_doc.parquet .*fix: rebuild"):
        ensure_built(str(tmp_path / "copy"))


class _Lookup(torch.nn.Module):
    """Next token from a table of known prefixes (logit 100, others 0); unknown prefixes give `default`.
    Its "KV cache" is the ids seen so far, so it decodes through the same calls as a HF model."""

    def __init__(self, seqs, vocab, default=EOS, flat=False):
        super().__init__()
        self.table = {tuple(s[:i]): s[i] for s in seqs for i in range(1, len(s))}
        self.vocab, self.default, self.flat = vocab, default, flat

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        ids = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], dim=1)
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        if not self.flat:
            for b in range(B):
                row = ids[b].tolist()
                for t in range(T):
                    logits[b, t, self.table.get(tuple(row[: ids.shape[1] - T + t + 1]), self.default)] = 100.0
        return type("Out", (), {"logits": logits, "past_key_values": ids})()


def _seqs(pairs):
    return [[EOS, *TOK.encode(p).ids, *TOK.encode(a).ids, EOS] for p, a in pairs]


PAIRS = [("Part of speech of: Slender\nAnswer:", " a."),
         ("Finish the verse: In the beginning God created the heaven and the\nAnswer:", " earth"),
         ("First docstring word of: get_loop\nAnswer:", " Return"), ("Part of speech of: Truck\nAnswer:", " n.")]


def test_a_model_that_knows_the_answers_gets_em_1_and_loss_0():
    s = score(_Lookup(_seqs(PAIRS), TOK.get_vocab_size()), TOK, EOS, PAIRS, batch_size=3)
    assert s == {"em": 1.0, "answer_loss": pytest.approx(0.0, abs=1e-6), "n": 4}


def test_uniform_model_has_loss_log_vocab_and_em_0():
    s = score(_Lookup([], TOK.get_vocab_size(), flat=True), TOK, EOS, PAIRS)
    assert s["em"] == 0.0 and s["answer_loss"] == pytest.approx(math.log(TOK.get_vocab_size()), rel=1e-6)


def test_wrong_and_partial_answers_miss():
    # the model answers " n." to two, and stops after " Ret" for get_loop
    wrong = [(p, " n.") for p, _ in PAIRS[:2]] + [(PAIRS[2][0], " Ret"), PAIRS[3]]
    s = score(_Lookup(_seqs(wrong), TOK.get_vocab_size()), TOK, EOS, PAIRS)
    assert s["em"] == 0.25  # only PAIRS[3], whose answer really is " n."


def test_batching_and_the_kv_cache_do_not_change_scores():
    from opmix_ray.config import ModelSection
    from opmix_ray.experiments.instruct_eval import _greedy
    from opmix_ray.model import build_model
    model = build_model(ModelSection(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                        TOK.get_vocab_size(), 64).eval()
    pairs = PAIRS + [("Part of speech of: Slim\nAnswer:", " adv.")]
    one, many = score(model, TOK, EOS, pairs, batch_size=1), score(model, TOK, EOS, pairs, batch_size=64)
    assert one["em"] == many["em"] and one["answer_loss"] == pytest.approx(many["answer_loss"], rel=1e-5)
    x = torch.as_tensor([[EOS, *TOK.encode(PAIRS[0][0]).ids]])
    with torch.no_grad():
        slow = x
        for _ in range(6):  # no cache: the whole sequence every step
            slow = torch.cat([slow, model(input_ids=slow).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert _greedy(model, x, 6).tolist() == slow[:, x.shape[1]:].tolist()


def test_in_stream_finds_whole_documents_on_token_boundaries():
    stream = np.asarray([7, 8, EOS, 5, EOS, 9, 6, EOS], np.uint16)
    assert _in_stream([7, 8], stream, EOS) and _in_stream([5], stream, EOS) and _in_stream([9, 6], stream, EOS)
    assert not _in_stream([8], stream, EOS) and not _in_stream([9], stream, EOS)
    # bytes 00 00 05 00 00 00 occur only at an odd byte offset here: not a token-aligned match
    assert not _in_stream([5], np.asarray([0x0500, 0x0000, 0x0100], np.uint16), EOS)


def test_trained_sample_is_in_the_training_stream_and_heldout_is_not(built):
    out, _ = built
    cfg = load_experiment_config({"data": {"path": str(out), "seq_len": 64, "val_tokens_per_domain": 1024,
                                "selection_tokens_per_domain": 0,  # as the instruct configs have it
                                "domains": ["bible", "dict_pos", "py_doc"]}})
    sh = build_shards(cfg)
    sets = load_sets(out, TOK, sh.eos_id, sh.train)
    assert set(sets) == {"dict_pos", "py_doc"}
    for task, s in sets.items():
        assert len(s["trained"]) == 200 and len(s["heldout"]) == 200
        assert all(_in_stream(TOK.encode(p + a).ids, sh.train[task], EOS) for p, a in s["trained"])
        assert not any(_in_stream(TOK.encode(p + a).ids, sh.train[task], EOS) for p, a in s["heldout"])
    assert majority_em(out, sets)["dict_pos"]["heldout"] == 0.5  # balanced: always "n." gets half


def test_instruct_configs_load_and_schedule_tasks():
    for name in ["continual_instruct.yaml", "continual_instruct_tiny.yaml"]:
        cfg = load_experiment_config(os.path.join(CONFIGS, name))
        assert cfg.schedule.instruct_eval and cfg.data.path
        seen = check_schedule(cfg)
        assert [d for d in seen[-1] if d in TASKS] == ["dict_pos", "bible_end", "py_doc"]
    assert load_experiment_config({}).schedule.instruct_eval is False


@pytest.mark.slow
def test_tiny_continual_instruct_end_to_end(experiment_results, tmp_path):
    res = experiment_results("continual", "continual_instruct_tiny.yaml", "--set", f"data.path={tmp_path / 'data'}",
                             "--set", "schedule.noise_orders=2")
    seen = res["seen_by_stage"]
    for n in res["noise_by_stage"]:  # uniform-seen's orders are scored on the tasks too: their answer-loss noise
        assert list(n["answer_loss"]) == [d for d in seen[n["stage"]] if d in TASKS]
        assert all(len(v["values"]) == 3 and math.isfinite(v["noise"]) for v in n["answer_loss"].values())
    for r in res["rows"]:
        tasks = [d for d in (seen[-1] if r["stage"] == 0 else seen[r["stage"]]) if d in TASKS]
        assert list(r["instruct"]) == tasks  # stage 0: zero-shot on every task
        for t in tasks:
            for split in ("heldout", "trained"):
                s = r["instruct"][t][split]
                assert 0 <= s["em"] <= 1 and math.isfinite(s["answer_loss"]) and s["n"] > 0
    assert set(res["instruct_majority_em"]) == set(TASKS)
    assert "exact match" in (tmp_path / "out" / "results.md").read_text()
