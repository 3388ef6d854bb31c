"""`opmix-ray submit` before anything is sent: the runtime_env's upload must fit Ray's limit, measured
with Ray's own packaging walk (excludes, .gitignore, .rayignore; Ray stores files uncompressed), and
the refusal names what to leave out."""
import os

import pytest

from opmix_ray.cli.submit import check_upload, upload_sizes
from opmix_ray.config import ConfigError

MIB = 2**20


def _tree(root, venv_bytes: bytes):
    (root / "pkg").mkdir()
    (root / "pkg" / "mod.py").write_text("x = 1\n" * 100)
    (root / "venv2" / "lib").mkdir(parents=True)
    (root / "venv2" / "lib" / "big.so").write_bytes(venv_bytes)


def test_a_working_dir_over_the_limit_is_refused_naming_the_largest_dir(tmp_path):
    _tree(tmp_path, os.urandom(3 * MIB))  # incompressible, like a venv's binaries
    total, per = upload_sizes(tmp_path, [])
    assert total > 3 * MIB and max(per, key=per.get) == "venv2"
    with pytest.raises(ConfigError, match=r"^config error at --runtime-env: .* would upload 3 MiB, over Ray's upload limit of 1 MiB; "
                                          r"the largest entries: venv2 \(3 MiB\)"):
        check_upload({"working_dir": str(tmp_path)}, limit=MIB)


def test_excludes_and_gitignore_are_what_ray_would_apply(tmp_path):
    _tree(tmp_path, os.urandom(3 * MIB))
    check_upload({"working_dir": str(tmp_path), "excludes": ["venv2"]}, limit=MIB)
    (tmp_path / ".gitignore").write_text("venv2/\n")
    check_upload({"working_dir": str(tmp_path)}, limit=MIB)
    assert upload_sizes(tmp_path, [])[1].get("venv2") is None


def test_the_shipped_runtime_env_fits(tmp_path):
    import yaml
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = yaml.safe_load(open(os.path.join(root, "cluster", "runtime_env.yaml")))
    env["working_dir"] = root
    check_upload(env)
