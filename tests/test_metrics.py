import pytest
import torch

from routing_lottery.metrics import binary_counts, confusion_matrix, macro, one_vs_rest_from_confusion


def test_one_vs_rest_on_a_hand_made_confusion_matrix():
    # rows: true class, columns: predicted
    cm = torch.tensor([[5, 1, 0],
                       [2, 6, 2],
                       [0, 0, 4]])
    per = one_vs_rest_from_confusion(cm)
    assert (per[0].tp, per[0].fn, per[0].fp, per[0].tn) == (5, 1, 2, 12)
    assert per[1].recall == pytest.approx(6 / 10)
    assert per[1].precision == pytest.approx(6 / 7)
    assert per[2].precision == pytest.approx(4 / 6) and per[2].recall == 1.0
    assert per[2].balanced_accuracy == pytest.approx((1.0 + 14 / 16) / 2)
    m = macro(per)
    # a K-way classifier's macro recall is its class-balanced accuracy
    assert m["recall"] == pytest.approx((5 / 6 + 6 / 10 + 4 / 4) / 3)


def test_binary_counts_and_zero_division():
    c = binary_counts(torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 0, 1, 1]))
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 1)
    assert c.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2) / 2)
    never = binary_counts(torch.zeros(4), torch.tensor([1, 0, 0, 0]))
    assert never.precision == 0.0 and never.recall == 0.0 and never.specificity == 1.0
    with pytest.raises(ValueError, match="shape"):
        binary_counts(torch.zeros(3), torch.zeros(4))


def test_confusion_matrix_counts():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
