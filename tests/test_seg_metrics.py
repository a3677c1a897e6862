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
