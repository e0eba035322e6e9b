"""Outputs that cannot destroy a user's files: output guards, run locks, atomic saves under SIGTERM,
stale temporaries, safe resume (no code from a checkpoint, no silent setting changes, torn logs),
and evaluation results that are never replaced by a partial run."""
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fedprune
from fedprune import atomic, save_model
from fedprune.cli import main
from fedprune.federated.config import dump_config, load_config
from fedprune.models.tiny import tiny_model
from fedprune.outputs import OutputLocked, OutputRefused, check_model_output, model_output_lock, run_lock

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=tiny-llama", "model.tokenizer=tiny-bpe", "data.max_examples_per_client=4", "train.local_steps=1",
        "train.grad_accum=1", "train.seq_len=48", "federation.rounds=2", "federation.clients_per_round=2",
        "eval.loss_examples=4", "eval.rouge_examples=0", "federation.dropout=false"]
SRC = str(ROOT / "src")

pytestmark = pytest.mark.usefixtures("one_thread")


def calib(n=4, seq=16):
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(0))


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def child(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout=60.0):
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout, "child never got ready"
        time.sleep(0.05)


@contextlib.contextmanager
def lock_held_by_child(lock_call: str, tmp_path: Path):
    """A child process that holds ``lock_call`` (e.g. ``run_lock('DIR')``) until the block ends."""
    ready = tmp_path / "child-ready"
    proc = child(f"""
        import time
        from pathlib import Path
        from fedprune.outputs import model_output_lock, run_lock
        with {lock_call}:
            Path({str(ready)!r}).touch()
            time.sleep(60)
        """)
    try:
        wait_for(ready, proc)
        ready.unlink()
        yield proc
    finally:
        proc.kill()
        proc.wait()


# ---- prune: outputs that cannot destroy anything ------------------------------------------------------
@pytest.fixture(scope="module")
def unloadable(tmp_path_factory):
    """A model directory whose config reads but whose weights do not: a command that fails on the
    output instead of on the weights checked the output first."""
    d = tmp_path_factory.mktemp("src") / "model"
    save_model(tiny_model("llama"), d)
    (d / "model.safetensors").write_bytes(b"not weights")
    return str(d)


def test_prune_refuses_a_folder_of_other_files_before_loading_the_model(tmp_path, capsys, unloadable):
    folder = tmp_path / "models"
    save_model(tiny_model("llama"), folder / "a")
    save_model(tiny_model("opt"), folder / "b")
    (folder / "notes.txt").write_text("do not lose me")
    before = tree(folder)
    assert main(["prune", "--model", unloadable, "--seq-len", "64", "--output", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "not empty and not a fedprune model" in err and "--overwrite" in err and "notes.txt" in err
    assert tree(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no hidden temporary either


def test_prune_refuses_a_file_and_an_existing_model_without_overwrite(tmp_path, capsys, unloadable):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"precious")
    assert main(["prune", "--model", unloadable, "--seq-len", "64", "--output", str(f)]) == 1
    assert "existing file" in capsys.readouterr().err and f.read_bytes() == b"precious"
    save_model(tiny_model("llama"), tmp_path / "pruned")
    assert main(["prune", "--model", unloadable, "--seq-len", "64", "--output", str(tmp_path / "pruned")]) == 1
    assert "already holds a fedprune model; pass --overwrite" in capsys.readouterr().err


def test_never_replaces_cwd_its_parents_or_home_even_with_overwrite(tmp_path, monkeypatch, capsys, unloadable):
    work = tmp_path / "home" / "me" / "work"
    work.mkdir(parents=True)
    (work / "data.txt").write_text("keep")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "me"))
    before = tree(tmp_path)
    for out, why in ((".", "current directory"), ("..", "contains the current directory"),
                     (str(work), "current directory")):
        assert main(["prune", "--model", unloadable, "--seq-len", "64", "--output", out, "--overwrite"]) == 1
        assert why in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputRefused, match="home directory"):
        save_model(tiny_model("llama"), tmp_path / "home" / "me", overwrite=True)
    assert tree(tmp_path) == before
    assert not [p for p in tmp_path.rglob(".*")]  # nothing hidden left anywhere


def test_api_prune_checks_the_output_before_pruning_and_overwrite_replaces(tmp_path):
    out = tmp_path / "p"
    first = tiny_model("llama", num_hidden_layers=4, intermediate_size=192)
    fedprune.prune(first, "comp", 0.3, calib_ids=calib(), layer_fraction=0.0, output=out)
    plan = (out / "plan.json").read_text()
    m = tiny_model("llama", num_hidden_layers=4, intermediate_size=192)
    n = sum(p.numel() for p in m.parameters())
    with pytest.raises(OutputRefused, match="already holds a fedprune model"):
        fedprune.prune(m, "comp", 0.5, calib_ids=calib(), layer_fraction=0.0, output=out)
    assert sum(p.numel() for p in m.parameters()) == n  # refused before any pruning
    assert (out / "plan.json").read_text() == plan
    fedprune.prune(m, "comp", 0.5, calib_ids=calib(), layer_fraction=0.0, output=out, overwrite=True)
    again = fedprune.load_model(out)
    ids = calib(2, 8)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, m(input_ids=ids).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no lock or temporary left


def test_overwrite_may_replace_a_file_or_unrelated_directory(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    save_model(tiny_model("llama"), f, overwrite=True)
    assert (f / "plan.json").is_file()
    d = tmp_path / "d"
    d.mkdir()
    (d / "junk").write_text("y")
    save_model(tiny_model("llama"), d, overwrite=True)
    assert not (d / "junk").exists() and (d / "plan.json").is_file()


# ---- atomic directories: SIGTERM and stale temporaries ---------------------------------------------------
@pytest.mark.parametrize("existing", [False, True])
def test_sigterm_during_a_save_leaves_no_temporary_and_keeps_the_old_output(tmp_path, existing):
    out, ready = tmp_path / "model", tmp_path / "ready"
    if existing:
        save_model(tiny_model("llama"), out)
    before = tree(tmp_path)
    proc = child(f"""
        import time
        from pathlib import Path
        from fedprune.atomic import atomic_directory
        from fedprune.models.tiny import tiny_model
        with atomic_directory({str(out)!r}) as tmp:
            tiny_model("llama").save_pretrained(tmp)
            Path({str(ready)!r}).touch()
            time.sleep(60)  # the slow step the signal interrupts
        """)
    wait_for(ready, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    ready.unlink()
    assert tree(tmp_path) == before  # the old model as it was, or nothing; no hidden temporary


def test_stale_temporaries_are_swept_and_nothing_else(tmp_path):
    host = atomic.host_tag()
    dead = dead_pid()
    out = tmp_path / "model"
    save_model(tiny_model("llama"), out)
    stale = [tmp_path / f".model.{dead}-{host}.ab12cd34.tmp", tmp_path / f".model.old-{dead}-{host}"]
    for s in stale:
        s.mkdir()
        (s / "model.safetensors").write_bytes(b"0" * 1000)
    stale_file = tmp_path / f".model.{dead}-{host}.0f0f0f0f.tmp"
    stale_file.write_bytes(b"half")
    keep = [tmp_path / f".model.{os.getpid()}-{host}.ab12cd34.tmp",  # a live writer's
            tmp_path / f".model.{dead}-{(int(host, 16) ^ 1):08x}.ab12cd34.tmp",  # another host's, recent
            tmp_path / ".model.notes.tmp", tmp_path / f".models.{dead}-{host}.ab12cd34.tmp", tmp_path / ".model"]
    for k in keep:
        k.write_text("mine")
    save_model(tiny_model("llama"), out, overwrite=True)
    assert not any(s.exists() for s in stale + [stale_file])
    assert all(k.read_text() == "mine" for k in keep)
    # an abandoned one of another host goes once it is older than the threshold
    old = time.time() - atomic.STALE_AFTER_S - 10
    os.utime(keep[1], (old, old))
    atomic.sweep_stale(out)
    assert not keep[1].exists() and keep[0].exists()


def test_a_swap_that_died_midway_is_restored_before_the_output_check(tmp_path):
    """Killed between moving the old directory aside and renaming the new one in: the old one is the
    only copy; the next writer puts it back (and, holding a model, refuses to replace it)."""
    aside = tmp_path / f".model.old-{dead_pid()}-{atomic.host_tag()}"
    save_model(tiny_model("llama"), aside)
    with pytest.raises(OutputRefused, match="already holds a fedprune model"):
        check_model_output(tmp_path / "model")
    assert (tmp_path / "model" / "plan.json").is_file() and not aside.exists()


# ---- locks ----------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_owner(tmp_path, capsys, unloadable):
    out = tmp_path / "pruned"
    with lock_held_by_child(f"model_output_lock({str(out)!r})", tmp_path) as proc:
        with pytest.raises(OutputLocked, match=f"pid {proc.pid} on host {socket.gethostname()}"):
            save_model(tiny_model("llama"), out)
        assert main(["prune", "--model", unloadable, "--seq-len", "64", "--output", str(out)]) == 1
        assert f"in use by pid {proc.pid}" in capsys.readouterr().err
    assert not out.exists()


def test_two_federated_runs_into_one_directory(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with lock_held_by_child(f"run_lock({str(run)!r})", tmp_path) as proc:
        assert main(["federate", *TINY, "--output", str(run)]) == 1
        assert f"in use by pid {proc.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in run.iterdir()) == [".fedprune.lock"]  # nothing written


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    pid = dead_pid()
    (run / ".fedprune.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    with caplog.at_level(logging.WARNING, logger="fedprune.outputs"):
        assert main(["federate", *TINY, "federation.rounds=1", "--output", str(run)]) == 0
    assert f"taking over the stale lock {run / '.fedprune.lock'} of pid {pid}" in caplog.text
    assert not (run / ".fedprune.lock").exists() and (run / "checkpoint.pt").is_file()
    # a lock held by a live process of *another* host is never taken over
    (run / ".fedprune.lock").write_text(json.dumps({"pid": pid, "host": "elsewhere", "started": "now"}))
    with pytest.raises(OutputLocked, match="on host elsewhere"):
        with run_lock(run):
            pass


def test_new_run_refuses_a_non_empty_directory(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    assert main(["federate", *TINY, "--output", str(d)]) == 1
    assert "not empty and not a fedprune run" in capsys.readouterr().err
    assert tree(d) == {"thesis.tex": b"years of work"}


# ---- safe resume ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fed") / "run"
    n = torch.get_num_threads()
    assert main(["federate", *TINY, "--output", str(run), "--threads", "1"]) == 0
    torch.set_num_threads(n)
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_checkpoint_is_refused_and_runs_no_code(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**state, "meta": Exploit(str(marker))}, run / "checkpoint.pt")
    before = tree(run)
    assert main(["federate", "--resume", str(run), "federation.rounds=3"]) == 1
    err = capsys.readouterr().err
    assert "refusing to load" in err and "checkpoint.pt" in err and "run code" in err
    assert not marker.exists()
    assert tree(run) == before  # config.yaml not rewritten, logs not truncated


def test_a_crafted_flower_node_state_is_refused(tmp_path):
    from flwr.common import ConfigRecord, Context, RecordDict

    from fedprune.federated.runtime.flower_app import DEVICE_STATE, _device_state, _store_device_state

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    keep = {"adamw": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]}}
    _store_device_state(ctx, keep)
    assert torch.equal(_device_state(ctx)["adamw"]["state"][0]["exp_avg"], torch.ones(2))
    marker = tmp_path / "pwned"
    ctx.state[DEVICE_STATE] = ConfigRecord({"torch": atomic_bytes(Exploit(str(marker)))})
    with pytest.raises(ValueError, match="refusing to load this node's saved device state"):
        _device_state(ctx)
    assert not marker.exists()


def atomic_bytes(obj) -> bytes:
    from fedprune.federated.runtime.run_state import torch_bytes

    return torch_bytes(obj)


@pytest.mark.parametrize("strategy", ["fedspine", "fedpruner"])
def test_strategy_checkpoints_are_plain_data(tmp_path, strategy):
    """What the strategies keep in the checkpoint (bandits, RNG states, masks) loads with weights_only."""
    cfg = {"fedspine": ROOT / "configs/federated/fedspine.yaml", "fedpruner": ROOT / "configs/federated/fedpruner.yaml"}
    extra = ["federation.ranks=[2,4]"] if strategy == "fedspine" else ["federation.strategy=fedpruner"]
    if strategy == "fedspine":
        extra.append("federation.options={export: none}")
    assert main(["federate", "--config", str(cfg[strategy]), *TINY, "federation.rounds=1", *extra,
                 "--output", str(tmp_path / "r")]) == 0
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert state["round"] == 1 and state["strategy"] == strategy and state["meta"]
    assert main(["federate", "--resume", str(tmp_path / "r"), "federation.rounds=2"]) == 0


def test_resume_refuses_changes_by_name_and_writes_nothing(run, capsys):
    before = tree(run)
    assert main(["federate", "--resume", str(run), "federation.rounds=3", "lora.rank=16", "train.lr=0.1"]) == 1
    err = capsys.readouterr().err
    assert "cannot change lora.rank from 8 to 16" in err and "train.lr" in err
    assert "only federation.rounds, eval.* may change" in err
    assert tree(run) == before
    # restating a setting with its current value is no change
    assert main(["federate", "--resume", str(run), "federation.strategy=fedit"]) == 0
    assert tree(run)["config.yaml"] == before["config.yaml"]


def test_resume_records_accepted_changes_after_validating(run):
    assert main(["federate", "--resume", str(run), "federation.rounds=3", "eval.rouge_examples=1"]) == 0
    cfg = load_config(run / "config.yaml")
    assert cfg.federation.rounds == 3 and cfg.eval.rouge_examples == 1
    log = [json.loads(x) for x in (run / "resumes.jsonl").read_text().splitlines()]
    assert log[-1]["after_round"] == 2
    assert log[-1]["changes"] == {"eval.rouge_examples": [0, 1], "federation.rounds": [2, 3]}
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_a_checkpoint_of_another_run_is_refused_before_anything_is_written(run, capsys):
    """Two runs interleaved: config.yaml says one strategy, the checkpoint holds the other."""
    cfg = load_config(run / "config.yaml", ["federation.strategy=flexlora"])
    atomic.write_text(run / "config.yaml", dump_config(cfg))
    before = tree(run)
    assert main(["federate", "--resume", str(run), "federation.rounds=3"]) == 1
    err = capsys.readouterr().err
    assert "is from strategy 'fedit' but" in err and "'flexlora'" in err and "written by two runs" in err
    assert tree(run) == before


def test_a_run_from_before_a_new_setting_existed_resumes(run):
    """A later fedprune adds config fields: an older run (its config.yaml and checkpoint without
    them) still resumes, the new fields taking their defaults."""
    from fedprune.federated.runtime.run_state import load_plain, torch_bytes

    state = load_plain((run / "checkpoint.pt").read_bytes(), "checkpoint")
    del state["config"]["federation"]["clip_norm"]
    atomic.write_bytes(run / "checkpoint.pt", torch_bytes(state))
    text = (run / "config.yaml").read_text()
    assert "clip_norm: 0" in text
    atomic.write_text(run / "config.yaml", text.replace("  clip_norm: 0.0\n", "").replace("  clip_norm: 0\n", ""))
    assert "clip_norm:" not in (run / "config.yaml").read_text()
    assert main(["federate", "--resume", str(run), "federation.rounds=3"]) == 0


def test_torn_last_log_line_is_tolerated_and_truncated_by_resume(run):
    torn = '{"round": 3, "test_lo'
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(torn)
    assert main(["report", str(run)]) == 0
    assert main(["federate", "--resume", str(run), "federation.rounds=3"]) == 0
    # the torn line was cut before round 3 was appended (else they would share a line that does not parse)
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_a_malformed_line_before_the_last_is_an_error_naming_file_and_line(run, capsys):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = tree(run)
    assert main(["report", str(run)]) == 1
    assert f"{run / 'metrics.jsonl'} line 2 is not valid JSON" in capsys.readouterr().err
    assert main(["federate", "--resume", str(run), "federation.rounds=3"]) == 1
    assert "line 2" in capsys.readouterr().err
    assert tree(run) == before


# ---- eval: complete results or a marked partial, never a partial in place of a complete one ----------------
@pytest.fixture
def eval_model(tmp_path):
    from fedprune.data.toy_tokenizer import toy_tokenizer

    tok = toy_tokenizer()
    d = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It was the best of times, it was the worst of times. " * 10)
    return d, corpus


def test_a_failed_eval_keeps_the_previous_complete_results(eval_model, tmp_path):
    model, corpus = eval_model
    out = tmp_path / "res.json"
    base = ["eval", "--model", str(model), "--seq-len", "16", "--output", str(out)]
    assert main([*base, "--tasks", f"text:{corpus}"]) == 0
    done = json.loads(out.read_text())
    assert done["complete"] is True and not (tmp_path / "res.json.partial").exists()
    assert main([*base, "--tasks", f"text:{corpus}"]) == 1  # an existing results file needs --overwrite
    before = out.read_bytes()
    short = tmp_path / "short.txt"  # exists (so it passes the checks before loading) but fails mid-run
    short.write_text("Too short.")
    assert main([*base, "--overwrite", "--tasks", f"text:{corpus},text:{short}"]) == 1
    assert out.read_bytes() == before
    partial = json.loads((tmp_path / "res.json.partial").read_text())
    assert partial["complete"] is False and list(partial["results"]) == [f"text:{corpus}"]
    assert "short.txt" in partial["error"]
    assert main([*base, "--overwrite", "--tasks", f"text:{corpus}"]) == 0
    assert json.loads(out.read_text())["complete"] is True and not (tmp_path / "res.json.partial").exists()
    assert main([*base, "--tasks", f"text:{corpus}", "--output", str(tmp_path)]) == 1  # a directory: refused


# ---- export: a GGUF file is replaced only with --overwrite ----------------------------------------------
def test_export_refuses_an_existing_file_before_reading_the_model(tmp_path, capsys, unloadable):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"someone's model")
    assert main(["export", "--model", unloadable, "--output", str(f)]) == 1
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite" in err and f.read_bytes() == b"someone's model"
    assert main(["export", "--model", unloadable, "--output", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no lock or temporary left behind


def test_flower_server_refuses_a_non_empty_run_directory_and_a_locked_one(tmp_path):
    pytest.importorskip("flwr")
    from fedprune.federated.runtime.flower_app import run_server

    cfg = load_config(None, TINY)
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("keep")
    with pytest.raises(OutputRefused, match="notes.txt"):
        run_server(None, cfg, used)  # refused before the grid is touched
    assert tree(used) == {"notes.txt": b"keep"}
    locked = tmp_path / "locked"
    with lock_held_by_child(f"run_lock({str(locked)!r})", tmp_path) as holder:
        with pytest.raises(OutputLocked, match=str(holder.pid)):
            run_server(None, cfg, locked)
