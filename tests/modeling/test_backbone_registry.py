"""A backbone is one decorated builder: registered by name, selected with ``backbone.type``, found without an
import by the proposal network."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from masqclip_cli.modeling.proposals.backbone import ResNet
from masqclip_cli.modeling.proposals.backbones import BACKBONES, build_backbone, register_backbone
from masqclip_cli.modeling.proposals.network import PROPOSAL_CONFIGS, build_proposal_network


def test_resnet_is_found_without_importing_it():
    code = ("from masqclip_cli.modeling.proposals.backbones import BACKBONES, build_backbone\n"
            "assert 'resnet' not in BACKBONES\n"
            "from masqclip_cli.modeling.proposals.network import PROPOSAL_CONFIGS\n"
            "net = build_backbone(PROPOSAL_CONFIGS['tiny']['backbone'])\n"
            "print(type(net).__name__, sorted(BACKBONES))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "ResNet" and "resnet" in out.stdout


def test_a_registered_backbone_is_built_by_type():
    calls = []

    @register_backbone("test-half-width")
    def build(config):
        calls.append(dict(config))
        return ResNet(depth=18, stem_out_channels=16, res2_out_channels=64, num_groups=1, width_per_group=16)

    try:
        config = copy.deepcopy(PROPOSAL_CONFIGS["tiny"])
        config["backbone"] = {"type": "test-half-width", "anything": 1}
        net = build_proposal_network(config)
        assert calls == [{"type": "test-half-width", "anything": 1}]
        assert net.backbone.out_channels == {"res2": 64, "res3": 128, "res4": 256, "res5": 512}
        with torch.no_grad():
            out = net(net.normalize_and_pad([torch.zeros(3, 64, 64, dtype=torch.uint8)]))
        assert out.pred_masks.shape[-2:] == (16, 16)
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("test-half-width")(lambda config: None)
    finally:
        BACKBONES.pop("test-half-width", None)
    with pytest.raises(ValueError, match="unknown backbone type 'nope'; known: resnet"):
        build_backbone({"type": "nope"})
