import json
import os
import stat

import pytest
import torch

from cxredit.checkpoint import (
    CheckpointError,
    load_checkpoint,
    pack,
    read_checkpoint_json,
    save_checkpoint,
    unpack,
)


def _optimizer_state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.99))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def test_pack_unpack_roundtrip_optimizer_state():
    _, opt = _optimizer_state()
    sd = opt.state_dict()
    tensors = {}
    skel = pack(sd, tensors, "opt")
    json.dumps(skel)  # the skeleton must be pure JSON
    back = unpack(json.loads(json.dumps(skel)), tensors)
    assert set(back["state"]) == set(sd["state"])  # int keys survive JSON
    for k, st in sd["state"].items():
        for name, v in st.items():
            assert torch.equal(back["state"][k][name], v)
    assert back["param_groups"][0]["betas"] == [0.0, 0.99]


def test_checkpoint_roundtrip_restores_optimizer_exactly(tmp_path):
    model, opt = _optimizer_state()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": 7,
             "rng": torch.get_rng_state(), "config": {"w_dim": 64, "name": "tiny"}}
    js = save_checkpoint(tmp_path / "ck" / "ckpt-000007", state, kind="test")
    assert js.name == "ckpt-000007.json"
    assert (tmp_path / "ck" / "ckpt-000007.safetensors").exists()
    assert not list((tmp_path / "ck").glob("*.tmp"))
    mask = os.umask(0o022)
    os.umask(mask)
    for f in (js, js.with_suffix(".safetensors")):  # readable as the umask allows, not 0600
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    back = load_checkpoint(js, kind="test")
    assert back["step"] == 7 and back["config"] == {"w_dim": 64, "name": "tiny"}
    assert torch.equal(back["rng"], torch.get_rng_state())

    # continuing from the loaded state gives the same parameters as continuing the original
    model2, opt2 = _optimizer_state()
    model2.load_state_dict(back["model"])
    opt2.load_state_dict(back["opt"])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


def test_checkpoint_rejects_wrong_kind_corruption_and_version(tmp_path):
    js = save_checkpoint(tmp_path / "a", {"w": torch.ones(3)}, kind="gan")
    with pytest.raises(CheckpointError, match="expected 'encoder'"):
        load_checkpoint(js, kind="encoder")
    st = tmp_path / "a.safetensors"
    data = bytearray(st.read_bytes())
    data[-1] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(js)
    doc = json.loads(js.read_text())
    doc["format_version"] = 99
    js.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="version 99"):
        read_checkpoint_json(js)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")


def test_pack_refuses_code_objects():
    with pytest.raises(TypeError, match="cannot store"):
        pack({"f": lambda x: x}, {}, "s")


def test_partial_load_reads_only_the_asked_entries(tmp_path):
    model, opt = _optimizer_state()
    js = save_checkpoint(tmp_path / "c", {"G": model.state_dict(), "opt": opt.state_dict(),
                                          "G_config": {"w": 3}, "x": torch.ones(2)}, kind="gan")
    part = load_checkpoint(js, keys=["G_config", "G", "x"])
    assert set(part) == {"G_config", "G", "x"} and part["G_config"] == {"w": 3}
    for k, v in model.state_dict().items():
        assert torch.equal(part["G"][k], v)
    assert torch.equal(part["x"], torch.ones(2))
    with pytest.raises(CheckpointError, match="no entry 'D'"):
        load_checkpoint(js, keys=["D"])


def test_identical_state_gives_identical_files(tmp_path):
    import torch

    from cxredit.checkpoint import checkpoint_sha256, save_checkpoint

    state = {"w": torch.arange(6.0).reshape(2, 3), "cfg": {"a": 1}}
    shas = {checkpoint_sha256(save_checkpoint(tmp_path / f"c{i}", state, "x")) for i in range(8)}
    assert len(shas) == 1  # content-addressed: the sha names the weights, not the save
