"""The seeded-weights manifest rebuilds exactly the state dict it describes, independent of key order."""

import torch

from seeded_weights import seeded_state_dict, state_dict_from, write_manifest, read_manifest


def test_manifest_rebuilds_state_dict(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(4, 5))
    state, manifest = seeded_state_dict(model.state_dict(), seed=7, literal=("1.running_mean",))
    assert torch.equal(state["1.running_mean"], model.state_dict()["1.running_mean"])
    assert state["1.num_batches_tracked"].dtype == torch.int64
    assert 0.5 <= state["1.running_var"].min() and state["1.running_var"].max() <= 1.5
    assert abs(state["0.weight"].std().item() - 27 ** -0.5) < 0.05
    write_manifest(manifest, tmp_path / "m.json")
    again = state_dict_from(read_manifest(tmp_path / "m.json"))
    assert set(again) == set(state)
    assert all(torch.equal(again[k], state[k]) for k in state)
    reordered = dict(reversed(list(manifest["tensors"].items())))
    assert torch.equal(state_dict_from(dict(manifest, tensors=reordered))["2.weight"], state["2.weight"])
    assert not torch.equal(state_dict_from(dict(manifest, seed=8))["2.weight"], state["2.weight"])
