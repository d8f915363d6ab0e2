"""Classifier head against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from masqclip_cli.modeling.classifier import classify


def test_two_queries_two_classes_by_hand():
    # unit vectors: query 0 equals class 0, query 1 is orthogonal to everything but background
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # class0, class1, background
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    log_p_obj = torch.tensor([math.log(0.5), math.log(0.25)])
    out = classify(emb, text, log_p_obj)
    assert torch.allclose(out.logits, torch.tensor([[100.0, 0.0, 0.0], [0.0, 60.0, 80.0]]))
    # query 0: softmax(100, 0, 0)
    z0 = 1 + 2 * math.exp(-100)
    # query 1: softmax(0, 60, 80)
    z1 = math.exp(-80) + math.exp(-20) + 1
    expected_p_clip = torch.tensor(
        [[1 / z0, math.exp(-100) / z0], [math.exp(-80) / z1, math.exp(-20) / z1]], dtype=torch.float64
    )
    expected = expected_p_clip * torch.tensor([[0.5], [0.25]], dtype=torch.float64)
    assert torch.allclose(out.p_cls.double(), expected, rtol=1e-5, atol=1e-30)
    # background dropped without renormalisation: row sums are p_obj * (1 - p_bg)
    assert out.p_cls.shape == (2, 2)
    assert out.p_cls[1].sum().item() == pytest.approx(0.25 * (1 - 1 / z1), rel=1e-5)


def test_no_object_score_is_p_clip_without_background():
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(2, 5, 8), dim=-1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    out = classify(emb, text, None)
    manual = torch.softmax(100 * emb @ text.T, dim=-1)[..., :3]
    assert torch.allclose(out.p_cls, manual, atol=1e-6)
    assert out.log_probs.shape == (2, 5, 4)


def test_custom_logit_scale_and_batch_shapes():
    torch.manual_seed(1)
    emb = F.normalize(torch.randn(3, 7, 16), dim=-1)
    text = F.normalize(torch.randn(6, 16), dim=-1)
    lp = torch.log(torch.rand(3, 7))
    out = classify(emb, text, lp, logit_scale=10.0)
    manual = torch.log_softmax(10.0 * emb @ text.T, -1)[..., :5] + lp[..., None]
    assert torch.allclose(out.log_p_cls, manual, atol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="embedding sizes differ"):
        classify(torch.zeros(2, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="log_p_obj shape"):
        classify(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="N >= 1"):
        classify(torch.zeros(2, 4), torch.zeros(1, 4))
