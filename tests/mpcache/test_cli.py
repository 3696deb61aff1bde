"""``python -m mpcache.launch`` end to end: real ``mpirun -n 2`` / ``-n 3`` on tiny-llama, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MPIRUN = BIN / "mpirun" if (BIN / "mpirun").exists() else Path(shutil.which("mpirun") or "mpirun")
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
PROMPT = "The capital of France is"
LAUNCH = [sys.executable, "-m", "mpcache.launch"]


def _cli(*flags: str, n: int | None = None, stdin: str | bytes | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [*LAUNCH, *flags]
    if n is not None:
        cmd = [str(MPIRUN), "--oversubscribe", "-n", str(n), *cmd]
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")  # never the caller's stdin
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, input=data, timeout=timeout)
    return subprocess.CompletedProcess(run.args, run.returncode, run.stdout.decode(errors="replace"),
                                       run.stderr.decode(errors="replace"))


def _plain_greedy(ids: list[int], n_new: int) -> tuple[list[int], list[float]]:
    from plaintext_ref.models import load_model
    hf = load_model("tiny-llama").model
    out, margins = [], []
    with torch.no_grad():
        for _ in range(n_new):
            logits = hf(torch.tensor([ids + out])).logits[0, -1]
            top = logits.topk(2).values
            margins.append(float(top[0] - top[1]))
            out.append(int(logits.argmax()))
    return out, margins


@pytest.mark.mpc
@pytest.mark.parametrize("n", [2, 3])
def test_cli_generates_plaintext_tokens(tmp_path, n):
    """The prompt arrives on standard input (rank 0 only); the tokens equal plaintext greedy decoding."""
    from plaintext_ref.models import load_tokenizer
    out_file = tmp_path / "run.json"
    n_new = 3 if n == 2 else 2
    run = _cli("--model", "tiny-llama", "--raw", "--max-new-tokens", str(n_new),
               "--json-out", str(out_file), n=n, stdin=PROMPT + "\n")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "MPC cost" in run.stdout and f"token   {n_new}/{n_new}" in run.stdout
    assert ("NOT SECURE" in run.stdout) == (n == 2) and "prompt length 5 tokens" in run.stdout
    assert "cache_after_prefill=5" in run.stdout and "decode / token" in run.stdout
    assert "sharing weights" in run.stderr and "prefill (5 tokens)" in run.stderr  # progress bars
    assert "warning: --prompt" not in run.stderr
    result = json.loads(out_file.read_text())
    assert result["provider"] == ("TFP" if n == 2 else "TTP")
    want, margins = _plain_greedy(load_tokenizer()(PROMPT)["input_ids"], n_new)
    for i, (g, w) in enumerate(zip(result["tokens"], want)):
        if g != w:  # only a near-tie in plaintext may flip, and then the continuations differ
            assert margins[i] < 2e-2, (result["tokens"], want, margins)
            break
    assert result["text"] in run.stdout


@pytest.mark.mpc
def test_cli_prompt_longer_than_context(tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("word " * 1100)
    run = _cli("--model", "tiny-gpt2", "--prompt-file", str(prompt), "--raw", n=2)
    assert run.returncode != 0
    assert "exceeds the model context of 1024 tokens" in run.stderr
    assert "Traceback" not in run.stderr and "sharing weights" not in run.stderr


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "   "], "--prompt is empty"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--device", "tpu"], "invalid choice"),
    (["--prompt", "x", "--prompt-file", "q.txt"], "give the prompt once"),
    (["--kv-policy", "quest", "--budget", "0.5"], "--budget for quest is a whole token count"),
    (["--kv-policy", "mpcache", "--budget", "3"], "--budget for mpcache is the fraction attended"),
    (["--kv-policy", "mpcache", "--n-sink", "4"], "--n-sink does not apply to --kv-policy mpcache"),
    (["--kv-policy", "full", "--no-share"], "--no-share does not apply to --kv-policy full"),
    (["--kv-policy", "snapkv", "--page-size", "8"], "--page-size does not apply"),
])
def test_cli_bad_flags(flags, message):
    """Usage errors: one line, exit 2, before anything starts (no mpirun needed)."""
    run = _cli(*flags, timeout=60)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.mpc
@pytest.mark.parametrize("flags, stdin, message", [
    (["--model", "/no/such/model"], PROMPT, "party 1 (model owner): --model '/no/such/model': not"),
    (["--json-out", "/no/such/folder/run.json"], PROMPT, "folder '/no/such/folder' does not exist"),
    (["--prompt-file", "/no/such/prompt.txt"], None, "--prompt-file '/no/such/prompt.txt': No such file"),
    (["--tokenizer", "/no/such/tokenizer"], PROMPT, "--tokenizer '/no/such/tokenizer': not"),
    ([], b"caf\xe9 au lait\n", "the prompt (standard input) is not UTF-8 text: byte 0xe9 at offset 3"),
    ([], "  \n", "the prompt is empty"),
    (["--timeout-s", "20"], None, "no prompt on standard input within"),
])
def test_cli_role_input_errors(flags, stdin, message):
    """Each rank checks its own input before joining the others: one line, exit 2, fast."""
    run = _cli("--model", "tiny-llama", *flags, n=2, stdin=stdin, timeout=90)
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "MPC cost" not in run.stdout


@pytest.mark.mpc
def test_cli_ranks_with_different_public_options_stop_at_once():
    """MPMD ranks given different token counts / budgets name the difference instead of hanging."""
    cmd = [str(MPIRUN), "--oversubscribe", "-n", "1", *LAUNCH, "--model", "tiny-llama", "--max-new-tokens", "3",
           "--kv-policy", "h2o", "--budget", "0.5", ":", "-n", "1", *LAUNCH, "--model", "tiny-llama",
           "--max-new-tokens", "5", "--kv-policy", "h2o"]
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, input=PROMPT, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    line = next(ln for ln in run.stderr.splitlines() if ln.startswith("mpcache: "))
    assert "different public options" in line and "party 1 (model owner)" in line, line
    assert "max_new_tokens 3 vs 5" in line and "kv.budget 0.5 vs None" in line, line


def test_cli_without_mpirun_prints_how_to_launch():
    run = _cli("--model", "tiny-llama", timeout=60)
    assert run.returncode == 2
    assert "echo PROMPT | mpirun -n 2" in run.stderr and "Traceback" not in run.stderr


def test_cli_help_lists_every_flag_without_heavy_imports():
    run = _cli("--help", timeout=60)
    assert run.returncode == 0
    for flag in ("--model", "--prompt-file", "--tokenizer", "--max-new-tokens", "--raw", "--device",
                 "--master-addr", "--timeout-s", "--json-out", "--log-level", "--kv-policy"):
        assert flag in run.stdout, flag
    # --help and usage errors answer at once: the CLI module imports no torch, transformers or CrypTen
    probe = subprocess.run([sys.executable, "-c", "import sys, mpcache.launch; print(sorted(m for m in "
                            "('torch', 'transformers', 'crypten') if m in sys.modules))"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr


@pytest.mark.mpc
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy,knobs", [
    ("full", ()), ("mpcache", ()),
    ("mpcache", ("--cluster-sizes", "16,8", "--level-ratios", "0.5,0.25", "--static-keep", "0.5")),
    ("streaming_llm", ("--n-sink", "4", "--n-recent", "32")), ("h2o", ("--budget", "0.25")),
    ("snapkv", ("--budget", "0.5")), ("quest", ("--budget", "32", "--page-size", "8"))])
def test_cli_on_cuda(tmp_path, policy, knobs):
    """Both parties on the GPU: the full cache gives the plaintext tokens; every policy runs to the
    end (public tensors must follow the shares onto the device); the second MPCache case has two
    levels, so the parent-candidate bias runs."""
    from plaintext_ref.models import load_tokenizer
    out_file = tmp_path / "run.json"
    prompt = " ".join([PROMPT] * 12)  # > 2 clusters of 16, so MPCache's selection really runs
    run = _cli("--model", "tiny-llama", "--raw", "--max-new-tokens", "3", "--device", "cuda",
               "--kv-policy", policy, *knobs, "--json-out", str(out_file), n=2, stdin=prompt)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out_file.read_text())
    if policy == "full":
        want, margins = _plain_greedy(load_tokenizer()(prompt)["input_ids"], 3)
        for i, (g, w) in enumerate(zip(result["tokens"], want)):
            if g != w:
                assert margins[i] < 2e-2, (result["tokens"], want, margins)
                break
