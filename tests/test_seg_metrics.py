import math

import torch

from tasks.metrics.segmentation import SegmentationMetrics


def test_miou_and_accuracy_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    metric = SegmentationMetrics(num_classes=5)
    metric.update(pred[None], target[None])
    out = metric.compute()
    # class 0: TP 1, FP 1 (pixel 5), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    # class 3: predicted only on an ignored pixel -> union 0 -> NaN; class 4: absent -> NaN
    iou = out["IoU_per_class"]
    torch.testing.assert_close(iou[:3], torch.tensor([1 / 3, 2 / 3, 1 / 2]))
    assert math.isnan(iou[3]) and math.isnan(iou[4])
    torch.testing.assert_close(out["mIoU"], torch.tensor((1 / 3 + 2 / 3 + 1 / 2) / 3))
    torch.testing.assert_close(out["acc"], torch.tensor(4 / 6))


def test_accumulates_over_the_dataset_not_per_image():
    metric = SegmentationMetrics(num_classes=2)
    metric.update(torch.tensor([[0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1]]))  # image IoUs: 3/4, 0
    metric.update(torch.tensor([[1, 1]]), torch.tensor([[1, 1]]))             # image IoU class 1: 1
    out = metric.compute()
    # dataset level: class 0 TP 3 FP 1 -> 3/4; class 1 TP 2 FN 1 -> 2/3
    torch.testing.assert_close(out["mIoU"], torch.tensor((3 / 4 + 2 / 3) / 2))


def test_scores_are_argmaxed():
    metric = SegmentationMetrics(num_classes=3)
    scores = torch.zeros(1, 3, 1, 2)
    scores[0, 2, 0, 0] = 1
    scores[0, 1, 0, 1] = 1
    metric.update(scores, torch.tensor([[[2, 1]]]))
    assert metric.compute()["mIoU"] == 1.0


def test_dataset_miou_matches_segmentation_models_pytorch():
    """Independent reference: smp's per-image tp/fp/fn, summed over the set, give the same IoUs."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    target = torch.randint(0, 6, (5, 24, 32))
    target[:, :4] = 255
    pred = torch.where(torch.rand(5, 24, 32) < 0.6, target.clamp(max=5), torch.randint(0, 6, (5, 24, 32)))
    ours = SegmentationMetrics(num_classes=6)
    ours.update(pred, target)
    out = ours.compute()
    tp, fp, fn, _ = smp.metrics.get_stats(pred, target, mode="multiclass", num_classes=6, ignore_index=255)
    tp, fp, fn = tp.sum(0).double(), fp.sum(0).double(), fn.sum(0).double()
    torch.testing.assert_close(out["IoU_per_class"].double(), tp / (tp + fp + fn), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["mIoU"].double(), (tp / (tp + fp + fn)).mean(), atol=1e-6, rtol=0)
