"""Checkpoint protocol in one process: resume equals the uninterrupted run (weights, Adam state, LR
position, RNG, data position); keep-last pruning; partial / corrupt checkpoints are refused with a
message naming them and the previous one is used; `verl-mega export` writes a HF directory that
transformers loads with our logits (tolerance 1e-5)."""

import json
import os

import pytest
import torch

from _engine_cases import build_engine, full_weights, history_diff, make_hf_dir, train
from verl_mega.parallel import Layout
from verl_mega.apps import export_cli
from verl_mega.trainer.checkpoint import find_checkpoint, load_checkpoint, read_marker, save_checkpoint


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("hf") / "llama"))


def test_resume_equals_uninterrupted_and_pruning(hf_dir, tmp_path):
    layout = Layout.create(1, 1, 1)
    full = build_engine(layout, hf_dir)
    full_hist = train(full, range(4), layout)

    engine = build_engine(layout, hf_dir)
    for step in range(3):
        train(engine, [step], layout)
        save_checkpoint(engine, str(tmp_path), step + 1, data_state={"next_step": step + 1}, keep_last=2,
                        tokenizer_path=hf_dir)
    rng_after_save = torch.rand(3)
    assert sorted(os.listdir(tmp_path)) == ["step_2", "step_3"]
    marker = read_marker(str(tmp_path / "step_3"))
    assert marker["step"] == 3 and marker["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert marker["model_config"]["hidden_size"] == 32 and marker["tokenizer_path"] == hf_dir

    resumed = build_engine(layout, hf_dir)
    info = load_checkpoint(resumed, str(tmp_path))
    assert info["step"] == 3 and info["data_state"] == {"next_step": 3} and info["refused"] == []
    assert torch.equal(torch.rand(3), rng_after_save)  # RNG state restored
    hist = train(resumed, [info["data_state"]["next_step"]], layout)
    assert history_diff(hist, full_hist[3:]) < 1e-6
    ref, got = full_weights(full, layout), full_weights(resumed, layout)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 1e-6
    assert resumed.step == 4 and resumed.adam_steps == 4


def test_partial_and_corrupt_checkpoints_are_refused(hf_dir, tmp_path):
    layout = Layout.create(1, 1, 1)
    engine = build_engine(layout, hf_dir)
    train(engine, [0], layout)
    save_checkpoint(engine, str(tmp_path), 1, data_state={"next_step": 1})
    train(engine, [1], layout)
    save_checkpoint(engine, str(tmp_path), 2, data_state={"next_step": 2})
    os.remove(tmp_path / "step_2" / "COMPLETE")  # as if the job died before the marker was written
    os.makedirs(tmp_path / "step_3")  # an empty directory
    (tmp_path / "step_3" / "COMPLETE").write_text("{not json")  # a corrupt marker
    os.makedirs(tmp_path / "step_4.tmp")  # an unfinished save (not a candidate)

    path, refused = find_checkpoint(str(tmp_path))
    assert path == str(tmp_path / "step_1")
    assert "step_3 is corrupt" in refused[0] and "step_2 is incomplete" in refused[1]
    fresh = build_engine(layout, hf_dir)
    info = load_checkpoint(fresh, str(tmp_path))
    assert info["step"] == 1 and len(info["refused"]) == 2
    with pytest.raises(ValueError, match=r"step_2 is incomplete: no COMPLETE marker"):
        read_marker(str(tmp_path / "step_2"))
    assert load_checkpoint(fresh, str(tmp_path / "nothing_here")) is None


def test_export_writes_transformers_loadable_dir(hf_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    layout = Layout.create(1, 1, 1)
    engine = build_engine(layout, hf_dir)
    train(engine, range(2), layout)
    save_checkpoint(engine, str(tmp_path / "ckpt"), 2, tokenizer_path=hf_dir)
    assert export_cli.main([str(tmp_path / "ckpt"), str(tmp_path / "hf_out")]) == 0
    assert f"load it with transformers' AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf_out')!r})" \
        in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_out"), dtype=torch.float32)
    ids = torch.randint(6, 120, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        ours = engine.model(ids, pos)[..., :120]
        theirs = hf(ids, position_ids=pos).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf_out"))("ab")["input_ids"]
    assert json.load(open(tmp_path / "hf_out" / "config.json"))["num_hidden_layers"] == 2
    assert export_cli.main([str(tmp_path / "empty"), str(tmp_path / "x")]) == 2
    # over another model's shards (e.g. a copy of a sharded checkpoint): refused, naming them; a loader that
    # follows the index (vLLM) would otherwise serve the old weights
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "model.safetensors.index.json").write_text("{}")
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert export_cli.main([str(tmp_path / "ckpt"), str(stale)]) == 2
    assert "already holds other weights (model-00001-of-00002.safetensors, model.safetensors.index.json" \
        in capsys.readouterr().err
    (tmp_path / "hf_out" / "training_args.bin").write_bytes(b"")  # not weights (a HF Trainer's output dir)
    assert export_cli.main([str(tmp_path / "ckpt"), str(tmp_path / "hf_out")]) == 0  # its own earlier export: fine


def test_export_accepts_run_checkpoints_actor_and_step_dirs(hf_dir, tmp_path, monkeypatch, capsys):
    """A checkpoint saved with a RELATIVE source path exports from another directory with its tokenizer and
    generation_config.json, whichever of run dir / checkpoints / checkpoints/actor / step_N is given."""
    import shutil

    src = tmp_path / "models" / "llama"
    shutil.copytree(hf_dir, src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 5, "temperature": 0.7}))
    layout = Layout.create(1, 1, 1)
    engine = build_engine(layout, hf_dir)
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    save_checkpoint(engine, str(run / "checkpoints" / "actor"), 3, tokenizer_path="models/llama")
    assert read_marker(str(run / "checkpoints" / "actor" / "step_3"))["tokenizer_path"] == str(src)  # stored absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for k, given in enumerate([run, run / "checkpoints", run / "checkpoints" / "actor",
                               run / "checkpoints" / "actor" / "step_3"]):
        out = tmp_path / f"hf_{k}"
        assert export_cli.main([str(given), str(out)]) == 0, capsys.readouterr().err
        assert (out / "generation_config.json").read_text() == (src / "generation_config.json").read_text()
        assert os.path.exists(out / "tokenizer.json") or os.path.exists(out / "tokenizer.model"), sorted(os.listdir(out))
    assert export_cli.main([str(tmp_path / "models"), str(tmp_path / "x")]) == 2
    assert "looked in" in capsys.readouterr().err
    assert export_cli.main([str(run), str(src / "config.json")]) == 2  # an output path that is a file: one line
    assert f"hf_out_dir {src / 'config.json'} is an existing file" in capsys.readouterr().err
    # the source model directory itself (the base model, the resumed run's reference): refused, before any write
    before = (src / "model.safetensors").read_bytes()
    assert export_cli.main([str(run), str(src)]) == 2
    assert f"hf_out_dir {src} is the run's source model directory (model.path)" in capsys.readouterr().err
    assert (src / "model.safetensors").read_bytes() == before


def test_bf16_engine_round_trips_fp32_masters(hf_dir, tmp_path):
    layout = Layout.create(1, 1, 1)
    engine = build_engine(layout, hf_dir, param_dtype=torch.bfloat16)
    train(engine, range(2), layout)
    os.makedirs(tmp_path / "step_0.tmp")  # leftover of an interrupted save: removed by the next save
    save_checkpoint(engine, str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["step_2"]
    fresh = build_engine(layout, hf_dir, param_dtype=torch.bfloat16)
    load_checkpoint(fresh, str(tmp_path))
    for a, b in zip(engine.zero.masters, fresh.zero.masters):
        assert b.dtype == torch.float32 and torch.equal(a, b)  # masters are saved in fp32, not rounded to bf16
    for a, b in zip(engine.model.parameters(), fresh.model.parameters()):
        assert b.dtype == torch.bfloat16 and torch.equal(a, b)
    assert history_diff(train(fresh, [2], layout), train(engine, [2], layout)) == 0
