"""`herd` as a user runs it: real answers, and one-line errors with a non-zero exit for bad input."""
import json
import shutil
import subprocess
import sys

import pytest

from herd.llm import default_model_path


def herd_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "herd.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=600)


def herd_clis(*commands, stdin="", env=None) -> list[subprocess.CompletedProcess]:
    """Several `herd` commands at once (each a process that starts Python and torch), their results in order."""
    started = [subprocess.Popen([sys.executable, "-m", "herd.cli", *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for args in commands]
    done = []
    for process in started:
        out, err = process.communicate(stdin, timeout=600)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return done


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("loaded ")]
    assert len(lines) == 1 and lines[0].startswith("herd: error:"), result.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.heavy
def test_chat_answers_the_capital_of_france():
    result = herd_cli("chat", "--temperature", "0", stdin="/sytem Be brief.\nWhat is the capital of France?\n")
    assert "Paris" in result.stdout
    assert "unknown command /sytem: /reset clears the conversation" in result.stderr  # named, not sent
    assert result.returncode == 2, result.stderr  # and the script learns that a line of it went unanswered
    assert herd_cli("chat", "--temperature", "0", stdin="What is the capital of France?\n").returncode == 0


def test_chat_commands_are_one_slash_word_and_a_mistyped_one_changes_nothing(capsys):
    from herd.cli import _is_command, _run_command

    assert [_is_command(m) for m in ("/reset", "/system Be brief.", "/?", "/sytem x", "/usr/bin/env python?",
                                     " /reset", "1/2 of what?", "/ alone")] == [True] * 4 + [False] * 4
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert _run_command("/sytem Be long.", dialog) == dialog and "unknown command /sytem" in capsys.readouterr().err
    assert _run_command("/system", dialog) == dialog and "needs the prompt's text" in capsys.readouterr().err
    assert _run_command("/system  Be kind. ", dialog) == [{"role": "system", "content": "Be kind."}, dialog[1]]
    assert _run_command("/reset", dialog) == dialog[:1]
    assert _run_command("/exit", dialog) is None


@pytest.mark.heavy
def test_prompt_longer_than_the_context_is_refused():
    result = herd_cli("generate", "-", stdin="Paris " * 9000)
    assert_one_line_error(result, "8192", "prompt")


@pytest.mark.heavy
def test_a_message_over_the_context_goes_unanswered_with_tools_too():
    """A script piping messages in learns that one went unanswered (exit 2); with --tools it had exited 0."""
    result = herd_cli("chat", "--tools", "wolfram_alpha", "--max-tokens", "8", stdin="Paris " * 9000)
    assert result.returncode == 2 and "herd: error: " in result.stderr and "8192" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_bad_sampling_options_fail_before_the_model_loads():
    # --seed had been "Overflow when unpacking long long" once the model was read, --logprobs -1 refused only then
    cases = (["--repetition-penalty", "0"], ["--min-p", "1.5"], ["--top-p", "0"], ["--seed", str(1 << 64)],
             ["--logprobs", "-1"])
    for args, result in zip(cases, herd_clis(*(["generate", "hi", *args] for args in cases))):
        assert_one_line_error(result, args[0][2:].replace("-", "_") if args[0] != "--logprobs" else "--logprobs")
        assert "loaded" not in result.stderr


def test_missing_model():
    result, hub_id = herd_clis(["generate", "hi", "--model", "/nowhere/model.gguf"],
                               ["generate", "hi", "--model", "meta-llama/Llama-3.1-8B-Instruct"])
    assert_one_line_error(result, "/nowhere/model.gguf")
    assert "hf download" not in result.stderr
    # a hub id: herd downloads nothing, and says how to
    assert_one_line_error(hub_id, "herd downloads nothing", "hf download meta-llama/Llama-3.1-8B-Instruct")


def test_a_hub_id_is_found_in_the_local_hub_cache(tmp_path):
    """transformers and vLLM load "org/name" from the hub cache offline; herd had only said how to download it.
    The cache as huggingface_hub lays it out: a ref naming a snapshot of links to content-addressed blobs."""
    import os

    repo = tmp_path / "hub" / "models--someone--SmolLM2-GGUF"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    os.symlink(default_model_path(), repo / "blobs" / "f00d")
    os.symlink("../../blobs/f00d", snapshot / "smollm2.Q4_1.gguf")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}

    models = [str(default_model_path()), "someone/SmolLM2-GGUF", "someone/SmolLM2-GGUF/smollm2.Q4_1.gguf",
              "someone/SmolLM2-GGUF/other.gguf", "someone/elsewhere"]
    expected, by_id, by_file, other, elsewhere = herd_clis(
        *(["generate", "The capital of France is", "--model", model, "--max-tokens", "4", "--temperature", "0"]
          for model in models), env=env)
    assert expected.returncode == 0 and expected.stdout.strip(), expected.stderr
    assert by_id.stdout == expected.stdout and by_file.stdout == expected.stdout
    assert_one_line_error(other, "hf download someone/SmolLM2-GGUF ")
    assert_one_line_error(elsewhere, "herd downloads nothing")


def test_standard_input_that_is_not_utf8_is_refused_as_a_file_is():
    """Its bytes had become U+FFFD tokens and run, exit 0, where the same bytes in a JSONL file are refused."""
    for args in (["tokenize", "-"], ["generate", "-", "--max-tokens", "1"], ["guard", "scan", "-"]):
        done = subprocess.run([sys.executable, "-m", "herd.cli", *args], input=b"caf\xe9 \xff", capture_output=True,
                              timeout=600)
        lines = done.stderr.decode().strip().splitlines()
        assert done.returncode != 0 and lines[-1] == ("herd: error: standard input is not UTF-8 text (byte 0xe9 at "
                                                      "offset 3); convert it, e.g. with iconv -t UTF-8"), done.stderr


def test_paths_that_cannot_be_used_are_named_with_what_to_give(tmp_path):
    """Each had been a bare "[Errno 17] File exists: ..." or "[Errno 20] Not a directory" (a guard's after its
    training), or --tokenizer beside --model was ignored, a broken one too."""
    afile = tmp_path / "afile.txt"
    afile.write_text("hello")
    rows = tmp_path / "sft.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    cases = [
        (["finetune", "--finetune.data", str(rows), "--run.dir", str(afile), "--training.steps", "1"],
         f"run.dir {afile} cannot be made (File exists); give a directory you can write to"),
        (["guard", "train", "prompt-guard", "--out", f"{afile}/x.npz"],
         f"cannot write {afile}/x.npz: Not a directory; give --out a file you can write to"),
        (["data", "report", str(afile)], f"no report.json in {afile}: not a finished `herd data run` output"),
        (["guard", "check", "--messages", str(tmp_path / "nope.json")],
         f"--messages {tmp_path / 'nope.json'}: cannot read it (No such file or directory)"),
        (["tokenize", "hi", "--model", "default", "--tokenizer", "/dev/null"], "give --model or --tokenizer, not both"),
        (["tokenize", "hi <|eot_id|>", "--chat", "--special"], "with --chat the text is a message"),
    ]
    for args, says in cases:
        assert_one_line_error(herd_cli(*args), says)


def test_truncated_gguf(tmp_path):
    broken = tmp_path / "broken.gguf"
    with open(default_model_path(), "rb") as f:
        broken.write_bytes(f.read(3_000_000))
    assert_one_line_error(herd_cli("info", str(broken)), "broken.gguf")


def test_params_json_that_disagrees_with_the_weights(tmp_path):
    import torch

    from herd.checkpoint import save_checkpoint
    from herd.model import ModelConfig, Transformer

    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_hidden_dim=96)
    out = save_checkpoint((config, Transformer(config).state_dict(), None), tmp_path / "meta", "meta")
    params = json.loads((out / "params.json").read_text())
    params["dim"] = 128
    (out / "params.json").write_text(json.dumps(params))
    from herd.tokenizer.llama3 import bundled_model_path

    shutil.copy(bundled_model_path(), out / "tokenizer.model")
    assert_one_line_error(herd_cli("generate", "hi", "--model", str(out)), "params.json")
    del torch


def test_tokenize_matches_the_library():
    import herd

    result = herd_cli("tokenize", "Hello, world! <|eot_id|>", "--special")
    assert result.returncode == 0
    assert json.loads(result.stdout.splitlines()[0]) == herd.load_tokenizer().encode(
        "Hello, world! <|eot_id|>", bos=True, allowed_special="all")


def test_info_counts_parameters_of_a_named_config():
    result = herd_cli("info", "llama3.1-405b")
    assert result.returncode == 0
    assert "405,853,388,800" in result.stdout


def test_convert_writes_a_checkpoint_that_gives_the_same_logits(tmp_path):
    import torch

    from herd.checkpoint import build_model, load_checkpoint, save_checkpoint
    from herd.model import ModelConfig, Transformer

    torch.manual_seed(0)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden_dim=96)
    source = save_checkpoint((config, Transformer(config).state_dict(), None), tmp_path / "hf", "hf")
    for fmt, extra in (("gguf", ["--gguf-type", "F32"]), ("meta", ["--shards", "2"])):
        out = tmp_path / f"out-{fmt}"
        result = herd_cli("convert", str(source), str(out), "--format", fmt, *extra)
        assert result.returncode == 0, result.stderr
        tokens = torch.randint(0, 256, (1, 12))
        with torch.inference_mode():
            expected = build_model(load_checkpoint(source))(tokens)
            assert torch.allclose(build_model(load_checkpoint(out))(tokens), expected, atol=1e-5)


def test_verify_checks_a_meta_checkpoint_against_its_checklist(tmp_path):
    import torch

    from herd.checkpoint import save_checkpoint
    from herd.model import ModelConfig, Transformer

    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden_dim=96)
    out = save_checkpoint((config, Transformer(config).state_dict(), None), tmp_path / "meta", "meta")
    # The list herd writes is md5sum's own: coreutils checks it.
    assert subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=out, capture_output=True).returncode == 0
    result = herd_cli("verify", str(out))
    assert result.returncode == 0 and "2 files" in result.stderr, result.stderr
    weights = out / "consolidated.00.pth"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # one bit of a tensor's bytes: the checkpoint still loads, but is not what was saved
    weights.write_bytes(bytes(data))
    (out / "params.json").unlink()
    assert_one_line_error(herd_cli("verify", str(out)), "consolidated.00.pth differs", "params.json is missing")
    assert_one_line_error(herd_cli("verify", "default"), "holds no checksums")
    del torch


def test_convert_takes_default_for_the_default_model(tmp_path):
    # Seven shards cannot split the default model's three key/value heads: the model was found and read.
    result = herd_cli("convert", "default", str(tmp_path / "out"), "--format", "meta", "--shards", "7")
    assert_one_line_error(result, "cannot split kv heads 3 into 7")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_an_unknown_format(tmp_path):
    result = herd_cli("convert", str(tmp_path), str(tmp_path / "out"), "--format", "onnx")
    assert_one_line_error(result, "onnx")


class RecordingLLM:
    """What `herd chat` and `herd generate` hand the model: each dialog and each prompt, with its settings."""

    def __init__(self):
        from types import SimpleNamespace

        self.chats, self.prompts = [], []
        self.chat_format = SimpleNamespace(encode_dialog=lambda dialog: [7, *map(len, (m["content"] for m in dialog))])

    def chat(self, messages, stream=False, **sampling):
        self.chats.append(([dict(m) for m in messages], sampling))
        yield "ok"

    def encode(self, text):
        return [len(text)]

    def generate(self, ids, stream=False, **sampling):
        self.prompts.append((ids, sampling))
        yield "ok"


def test_chat_and_generate_hand_the_model_the_dialog_and_settings_asked_for(monkeypatch):
    """--system, the dialog so far, /system and /reset, and every sampling option reach the model (the tests of
    real answers could not tell: a chat that dropped its system prompt or its history answered them as well)."""
    from typer.testing import CliRunner

    from herd import cli

    llm = RecordingLLM()
    monkeypatch.setattr(cli, "_load", lambda *args, **kwargs: llm)
    result = CliRunner().invoke(cli.app, ["chat", "--system", "Be kind.", "--temperature", "0", "--max-tokens", "7",
                                          "--top-k", "3", "--seed", "5"],
                                input="first\nsecond\n/system Be terse.\nthird\n/reset\nfourth\n")
    assert result.exit_code == 0, result.output
    user, said = (lambda text: {"role": "user", "content": text}), {"role": "assistant", "content": "ok"}
    assert [dialog for dialog, _ in llm.chats] == [
        [{"role": "system", "content": "Be kind."}, user("first")],
        [{"role": "system", "content": "Be kind."}, user("first"), said, user("second")],
        [{"role": "system", "content": "Be terse."}, user("first"), said, user("second"), said, user("third")],
        [{"role": "system", "content": "Be terse."}, user("fourth")],
    ]
    assert all(s["temperature"] == 0 and s["max_tokens"] == 7 and s["top_k"] == 3 and s["seed"] == 5
               for _, s in llm.chats)
    for args, ids in ((["Hi"], [2]), (["Hi", "--chat"], [7, 2])):
        result = CliRunner().invoke(cli.app, ["generate", *args, "--max-tokens", "9", "--stop", "X", "--stop", "Y",
                                              "--top-p", "0.5", "--temperature", "0.7", "--seed", "11"])
        assert result.exit_code == 0, result.output
        got, sampling = llm.prompts[-1]
        assert got == ids and sampling["stop"] == ("X", "Y") and sampling["max_tokens"] == 9
        assert (sampling["top_p"], sampling["temperature"], sampling["seed"]) == (0.5, 0.7, 11)


@pytest.mark.parametrize("command", [["generate", "Hi"], ["chat"], ["--port", "0"]])
def test_dtype_reaches_the_load(monkeypatch, command):
    """--dtype bfloat16 is how a GPU's user halves the memory of float32 (an 8B model had needed 32 GB, past a
    24 GB card, with no way to ask for less from the command line); auto leaves herd.load to choose."""
    import torch
    import typer
    from typer.testing import CliRunner

    import herd
    from herd import cli

    asked = []

    def load(*args, **kwargs):
        asked.append(kwargs["dtype"])
        raise SystemExit(0)  # the load is what is looked at, not what follows

    monkeypatch.setattr(herd, "load", load)
    app = cli.app
    if command[0] == "--port":  # herd serve, which main() adds to the app
        from herd.serve.cli import serve_cmd

        app = typer.Typer()
        app.command()(serve_cmd)
    for dtype, expected in (("bfloat16", torch.bfloat16), ("auto", None), ("float16", torch.float16)):
        result = CliRunner().invoke(app, [*command, "--dtype", dtype], input="")
        assert result.exit_code == 0, result.output
        assert asked[-1] == expected
    result = CliRunner().invoke(app, [*command, "--dtype", "bf16"], input="")
    assert result.exit_code == 2 and "use one of auto, float32, bfloat16, float16" in result.output


def test_the_default_dtype_is_half_precision_on_a_gpu_only(monkeypatch):
    import torch

    from herd.llm import default_dtype

    for bf16, expected in ((True, torch.bfloat16), (False, torch.float16)):  # float16 on a V100 or T4
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
        assert default_dtype(torch.device("cuda")) == expected
    assert default_dtype(torch.device("cpu")) == torch.float32


def test_chat_reads_continued_lines_and_blocks_as_one_message(monkeypatch):
    from herd import cli

    typed = iter(["first \\", "second", '"""', "block one", "block two", '"""', "last"])

    def fake_input(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    # only a message typed as one line can be a /command
    assert cli._read_message(interactive=False) == ("first \nsecond", False)
    assert cli._read_message(interactive=False) == ("block one\nblock two", False)
    assert cli._read_message(interactive=False) == ("last", True)
    assert cli._read_message(interactive=False) is None  # end of input


def test_chat_pipes_blocks_as_text_and_names_what_it_cannot_answer():
    """A block starting with /exit had quit (and one starting /reset wiped the chat), bytes that are no UTF-8 had
    reached the model as U+FFFD, and a script's unknown /command exited 0."""
    block = '"""\n/exit is a command in many shells\n"""\n'
    done = subprocess.run([sys.executable, "-m", "herd.cli", "chat", "--temperature", "0", "--max-tokens", "3"],
                          input=block.encode() + b"caf\xe9\n/imagine a cat\nhi\n", capture_output=True, timeout=600)
    err = done.stderr.decode()
    replies = [line for line in done.stdout.decode().splitlines() if line.strip()]
    assert len(replies) == 2, done.stdout  # the block and "hi": the others went unanswered, each named
    assert "the message is not UTF-8 text (byte 0xe9)" in err and "unknown command /imagine" in err
    assert done.returncode == 2 and "Traceback" not in err


def test_data_subcommand_errors_exit_non_zero(tmp_path):
    assert_one_line_error(herd_cli("data", "run", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")),
                          "nope.jsonl")


def test_a_group_without_its_command_shows_its_help_and_no_empty_error():
    for args in ((), ("data",), ("guard",)):
        result = herd_cli(*args)
        assert result.returncode != 0
        assert "Commands" in result.stdout + result.stderr  # the help, listing what to run
        assert "herd: error:" not in result.stderr, result.stderr


def test_kv_cache_mib_sets_how_much_of_a_long_context_is_held(tmp_path):
    import herd
    from herd.checkpoint import save_checkpoint
    from herd.model import ModelConfig, Transformer

    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_hidden_dim=128,
                         max_seq_len=131072)
    path = save_checkpoint((config, Transformer(config).state_dict(), herd.load_tokenizer()), tmp_path / "m", "hf")
    prompt = "Paris " * 9000  # about 9,000 tokens: past the 8,192 any cache holds, within the model's context
    small, large = herd_clis(["generate", "-", "--model", str(path), "--kv-cache-mib", "1"],
                             ["generate", "-", "--model", str(path), "--kv-cache-mib", "8", "--max-tokens", "2"],
                             stdin=prompt)
    assert_one_line_error(small, "This model's maximum context length is 131072 tokens, but the KV cache holds 8192",
                          "give the cache more memory")
    assert large.returncode == 0, large.stderr


def test_a_damaged_vocabulary_is_one_line(tmp_path):
    # One byte of the default model's first merge changed: its result is no token (a Rust panic in tokenizers).
    damaged = tmp_path / "damaged.gguf"
    shutil.copy(default_model_path(), damaged)
    data = damaged.read_bytes()[:3_000_000]
    at = data.index(b"tokenizer.ggml.merges") + len(b"tokenizer.ggml.merges") + 4 + 4 + 8 + 8  # type, count, length
    with open(damaged, "r+b") as f:
        f.seek(at)
        f.write(b"Q")
    assert_one_line_error(herd_cli("generate", "hi", "--model", str(damaged)), "damaged.gguf", "vocabulary is damaged")
    # tokenize --model had taken the missing tokenizer for one: AttributeError
    assert_one_line_error(herd_cli("tokenize", "hi", "--model", str(damaged)), "damaged.gguf", "vocabulary is damaged")
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}}')
    assert_one_line_error(herd_cli("tokenize", "hi", "--tokenizer", str(tokenizer)), "tokenizer.json")


def test_a_panic_in_a_rust_library_is_one_line(monkeypatch, capsys):
    import herd.cli
    import herd.tokenizer

    panic = type("PanicException", (BaseException,), {})  # what pyo3 raises: no Exception

    def load_tokenizer(path=None):
        raise panic("range end index 2 out of range for slice of length 1")

    monkeypatch.setattr(herd.tokenizer, "load_tokenizer", load_tokenizer)
    monkeypatch.setattr(herd.cli.signal, "signal", lambda *args: None)  # main's SIGTERM handler stays out of pytest
    monkeypatch.setattr(sys, "argv", ["herd", "tokenize", "hi"])
    with pytest.raises(SystemExit) as exit_:
        herd.cli.main()
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "herd: error: range end index 2 out of range for slice of length 1 (PanicException; HERD_DEBUG=1 shows where)"]


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])  # SIGHUP: the terminal closed, an ssh session dropped
def test_sigterm_removes_the_half_written_output_as_ctrl_c_does(tmp_path, stop):
    import os
    import signal
    import time

    stop = getattr(signal, stop)

    process = subprocess.Popen([sys.executable, "-m", "herd.cli", "convert", "default", "out", "-f", "hf"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(stop, signal.SIG_DFL))  # not nohup's, if run so
    deadline = time.monotonic() + 120
    while not any(tmp_path.iterdir()) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the conversion ended before it was stopped"
    os.kill(process.pid, stop)  # as `kill`, `timeout` or a job scheduler stop a run
    assert process.wait(timeout=60) == 128 + stop, process.stderr.read()
    assert not list(tmp_path.iterdir())  # had been a hidden temporary copy of the model, 500 MB, left for good


def test_an_empty_classifier_file_is_one_line_not_a_silent_interrupt(tmp_path):
    (tmp_path / "empty.npz").write_bytes(b"")
    result = herd_cli("guard", "score", "hi", "--prompt-guard", str(tmp_path / "empty.npz"))
    assert result.returncode == 2  # had been 130 and a blank line: click took the file's EOFError for Ctrl-D
    assert_one_line_error(result, "empty.npz")


@pytest.mark.heavy
def test_a_piped_chat_with_a_message_over_the_context_exits_non_zero():
    result = herd_cli("chat", "--max-tokens", "2", stdin="Hi\n" + "Paris " * 9000 + "\n")
    assert result.returncode == 2  # had been 0: a script could not tell that a message went unanswered
    assert "herd: error:" in result.stderr and "8192" in result.stderr


def test_a_file_that_ends_early_anywhere_is_one_line_not_an_interrupt(monkeypatch, capsys):
    """click turns an EOFError into Abort, as if Ctrl-D had been pressed: a blank line and exit 130, where a file
    ended early (an empty pickle, npz or .pt read by any command)."""
    import herd.cli
    import herd.tokenizer

    def load_tokenizer(path=None):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(herd.tokenizer, "load_tokenizer", load_tokenizer)
    monkeypatch.setattr(herd.cli.signal, "signal", lambda *args: None)
    monkeypatch.setattr(sys, "argv", ["herd", "tokenize", "hi"])
    with pytest.raises(SystemExit) as exit_:
        herd.cli.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "herd: error: a file ended early: it is empty or truncated (Ran out of input)"]


def test_ctrl_c_while_the_commands_load_is_exit_130_not_a_traceback():
    """The commands' modules take a second or two to import, before main()'s handling began."""
    import subprocess
    import sys

    code = ("import sys\n"
            "class Interrupting:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'herd.data.cli':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupting())\n"
            "sys.argv = ['herd', '--version']\n"
            "from herd.cli import main\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr


def test_an_unreadable_gguf_says_so_not_that_it_is_damaged(monkeypatch, tmp_path):
    from herd.checkpoint import gguf
    from herd.checkpoint.errors import CheckpointError

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(gguf, "GGUFFile", refuse)
    with pytest.raises(CheckpointError) as error:
        gguf.open_reader(tmp_path / "model.gguf")
    assert str(error.value) == f"{tmp_path / 'model.gguf'}: cannot be read (Permission denied): give this user read " \
        "access to it"


class TightLLM(RecordingLLM):
    """A context of 12 characters of content: a conversation past it is refused, as a real one past its tokens."""

    def chat(self, messages, stream=False, **sampling):
        from herd.generate import ContextLengthError

        if sum(len(m["content"]) for m in messages) > 12:
            raise ContextLengthError("the prompt has too many tokens for the model's context")
        yield from super().chat(messages, stream, **sampling)


def test_a_conversation_past_the_context_leaves_out_its_oldest_exchanges(monkeypatch):
    """It had been refused turn after turn until /reset threw all of it away; ollama leaves out the oldest turns."""
    from typer.testing import CliRunner

    from herd import cli

    llm = TightLLM()
    monkeypatch.setattr(cli, "_load", lambda *args, **kwargs: llm)
    result = CliRunner().invoke(cli.app, ["chat", "--system", "S"],
                                input="aaa\nbbb\nccc\nddddddddddddddd\nee\n")
    assert result.exit_code == 2  # one message alone is past the context: unanswered, and a script learns it
    user, said = (lambda text: {"role": "user", "content": text}), {"role": "assistant", "content": "ok"}
    system = {"role": "system", "content": "S"}
    assert [dialog for dialog, _ in llm.chats] == [
        [system, user("aaa")], [system, user("aaa"), said, user("bbb")], [system, user("bbb"), said, user("ccc")],
        # the message refused leaves the conversation as it was, and its own room is made again
        [system, user("ccc"), said, user("ee")]]
    assert result.output.count("(the oldest 1 exchange(s) left out") == 2
    assert "ddddddddddddddd" not in str(llm.chats) and "too many tokens" in result.output


def test_ctrl_c_while_typing_drops_what_was_typed_and_the_chat_goes_on(monkeypatch, capsys):
    """It had ended the session, conversation and all, and was the only way out of a mistyped \"\"\" block."""
    from herd.cli import _read_message

    def typed(*lines):
        feed = iter(lines)

        def read(prompt=""):
            line = next(feed)
            if line is KeyboardInterrupt:
                raise KeyboardInterrupt
            return line

        monkeypatch.setattr("builtins.input", read)

    typed(KeyboardInterrupt, "hello")
    assert _read_message(True) == ("hello", True) and "(Ctrl-D or /exit quits)" in capsys.readouterr().err
    typed('"""', "a long", KeyboardInterrupt, "short")
    assert _read_message(True) == ("short", True) and "(discarded)" in capsys.readouterr().err
    typed(KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):  # piped in, Ctrl-C stops the script
        _read_message(False)
    typed("first \\\r", "second\r")  # a file with Windows line ends: no \r in the message, \ still continues
    assert _read_message(False) == ("first \nsecond", False)


def test_an_interrupted_tool_turn_takes_its_message_back(capsys):
    """The message had stayed in the history with no answer, and the next turns sent user messages in a row."""
    from herd.tools.cli import agent_turn

    class Interrupted:
        def run(self, history):
            raise KeyboardInterrupt
            yield

    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"},
               {"role": "user", "content": "a long story"}]
    assert agent_turn(Interrupted(), history)
    assert history == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}]
    assert "message is taken back" in capsys.readouterr().err


def test_files_from_the_code_interpreter_keep_their_folders_and_never_replace_one(tmp_path, monkeypatch):
    """a/r.txt and b/r.txt had both been saved as r.txt, the second over the first without a word."""
    from herd.tools.cli import _save

    monkeypatch.chdir(tmp_path)
    saved = [_save(name, data) for name, data in (("a/r.txt", b"1"), ("b/r.txt", b"2"), ("b/r.txt", b"3"),
                                                   ("../../x.png", b"4"))]
    assert [str(p) for p in saved] == ["herd-files/a/r.txt", "herd-files/b/r.txt", "herd-files/b/r-2.txt",
                                       "herd-files/x.png"]
    assert [p.read_bytes() for p in saved] == [b"1", b"2", b"3", b"4"]
    # a folder whose name a saved file already has: beside it, flattened, not a FileExistsError ending the chat
    assert str(_save("x.png/inner.txt", b"5")) == "herd-files/x.png-inner.txt"


def test_text_the_terminal_cannot_show_is_escaped_not_a_crash(tmp_path):
    """Under a Latin-1 or ASCII terminal encoding, the first character it lacks had ended the command with an
    error, the rest of the reply lost."""
    import os

    done = subprocess.run([sys.executable, "-m", "herd.cli", "tokenize", "café 😀"], capture_output=True,
                          text=True, encoding="ascii", errors="strict", timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[128000, 936, 59958, 91416]\n")  # the text's own ids
    assert "f\\xe9" in done.stdout and "\\U0001f600" in done.stdout


def test_under_nohup_a_closed_terminal_stops_nothing(tmp_path):
    """SIGHUP ignored by nohup had been handled again (as SIGTERM, to clean up): `nohup herd ... &` died at logout."""
    import os
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "herd.cli", "convert", "default", "out", "-f", "hf"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup starts it
    deadline = time.monotonic() + 120
    while not any(tmp_path.iterdir()) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the conversion ended before the terminal closed"
    os.kill(process.pid, signal.SIGHUP)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    assert (tmp_path / "out" / "config.json").is_file()
