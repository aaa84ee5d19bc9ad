"""Progress of long work counts what it says (N tensors loaded -> N, L layers quantized
-> L, every tensor published) and shows as bars only on a terminal: off one, nothing
but one log line per stage."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

from safetensors import safe_open

from colocate import progress
from colocate.memory.weight_store import WeightStore
from colocate.model.gguf_file import open_gguf
from colocate.model.model_config import LlamaConfig
from colocate.model.published import published_path
from colocate.quant.gguf_loading import gguf_quant_config, read_gguf_state
from colocate.quant.loading import load_model

import torch

LOAD_TINY = ("import sys; from colocate.quant.loading import load_model; "
             "load_model(sys.argv[1], quantization='int8')")


def _file_tensors(model_dir) -> tuple[int, int]:
    """(tensors, bytes) in the tiny checkpoint's safetensors file, read directly."""
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys() if "rotary_emb" not in k]
    return len(tensors), sum(t.nbytes for t in tensors)


def test_loading_counts_every_tensor_and_quantizing_every_layer(tiny_model_dir):
    n, nbytes = _file_tensors(tiny_model_dir)
    layers = LlamaConfig.from_pretrained(tiny_model_dir).num_hidden_layers
    with progress.using(progress.Recorder()) as rec:
        load_model(tiny_model_dir, quantization="int8")
    totals = rec.totals()
    assert totals["loading"] == (n, n, nbytes)           # float32 as stored: same bytes
    assert totals["quantizing int8"] == (layers, layers, 0)


def test_gguf_loading_counts_every_tensor_in_the_file():
    path = published_path("smollm2-135m-instruct")
    config = LlamaConfig.from_pretrained(path)
    tensors = open_gguf(path).tensors
    qc = gguf_quant_config(config, None, None, "cpu")      # int4 linears kept as stored
    with progress.using(progress.Recorder()) as rec:
        read_gguf_state(config, torch.float32, qc)
    # SmolLM2 ties its embeddings: 9 tensors a layer, the embedding and the final norm.
    n = 9 * config.num_hidden_layers + 2
    assert len(tensors) == n
    assert rec.totals()["loading"] == (n, n, sum(t.data.nbytes for t in tensors.values()))


def test_publishing_counts_every_tensor_of_the_buffer(tiny_model_dir, tmp_path):
    with WeightStore(root=tmp_path) as store, progress.using(progress.Recorder()) as rec:
        with progress.labelled("tiny"):
            handle = store.publish("tiny", tiny_model_dir)
        store.publish("tiny", tiny_model_dir)           # published once: no second stage
    totals = rec.totals()
    assert totals["tiny publishing"] == (len(handle.specs), len(handle.specs),
                                         handle.tensor_bytes)
    assert [e[2] for e in rec.events() if e[0] == "begin"] == ["tiny loading",
                                                              "tiny publishing"]


def test_replay_prefixes_another_process_stages():
    sender, shown = progress.Recorder(), progress.Recorder()
    with progress.using(sender), progress.stage("starting services", 3, "service") as bar:
        bar.advance(1)
        keys: dict = {}
        progress.replay(sender.events(), shown, "cpu: ", keys)   # mid-stage: one poll
        seen = len(sender.events())
        bar.advance(2)
    progress.replay(sender.events(seen), shown, "cpu: ", keys)
    assert shown.totals() == {"cpu: starting services": (3, 3, 0)}


def test_off_a_terminal_one_line_per_stage(caplog):
    with caplog.at_level(logging.INFO, logger="colocate.progress"):
        with progress.using(progress.auto(io.StringIO())) as reporter:
            with progress.stage("loading", 2, "tensor") as bar:
                bar.advance(2, nbytes=3 * progress.MIB)
    assert isinstance(reporter, progress.Lines)
    (line,) = reporter.file.getvalue().splitlines()
    assert line.startswith("loading: 2 tensors, 3.0 MiB in ")
    assert isinstance(progress.auto(quiet=True), progress.Silent)


def _run_load(tiny_model_dir, stderr) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", LOAD_TINY, str(tiny_model_dir)],
                          stdout=subprocess.PIPE, stderr=stderr, env=env, timeout=300)


def test_load_is_silent_when_stderr_is_not_a_terminal(tiny_model_dir):
    done = _run_load(tiny_model_dir, subprocess.PIPE)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b"" and done.stdout == b""


def test_load_shows_bars_on_a_terminal(tiny_model_dir):
    master, slave = os.openpty()
    try:
        done = _run_load(tiny_model_dir, slave)
        os.close(slave)
        slave = None
        assert done.returncode == 0
        screen = b""
        while True:                          # the child has exited: read what it left
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    text = screen.decode(errors="replace")
    n, _ = _file_tensors(tiny_model_dir)
    assert "loading: 100%" in text and f"{n}/{n} tensors" in text, text
    assert "quantizing int8: 100%" in text, text


def test_serve_quiet_turns_progress_off():
    from colocate.cli import build_parser

    assert build_parser().parse_args(["serve", "--quiet"]).quiet is True
    assert build_parser().parse_args(["serve"]).quiet is False
