"""The annotate loop: rounds of segment -> correct -> add -> fine-tune, every case's Dice per
round (so forgetting shows), and the rows of the scores table. No Qt, no Slicer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class RoundHistory:
    """Rounds of segment -> correct -> add -> fine-tune, and each case's Dice per round.

    Round ``n`` is the model after the ``n``-th fine-tuning. A case's row shows its Dice under
    every round's model, so a validation case whose Dice falls after a later round (the model
    forgetting it) stands out.
    """

    def __init__(self) -> None:
        self.rounds: list[dict] = []
        self.scores: dict[str, dict[int, float]] = {}

    @property
    def current(self) -> int:
        return len(self.rounds)

    def begin(self, model: str, training_cases: Sequence[str]) -> int:
        self.rounds.append({"model": model, "training_cases": list(training_cases)})
        return self.current

    def record(self, round_number: int, case: str, dice: float) -> None:
        if not 1 <= round_number <= self.current:
            raise ValueError(f"There is no round {round_number}; rounds run 1..{self.current}.")
        self.scores.setdefault(case, {})[round_number] = float(dice)

    def forgetting(self, tolerance: float = 0.02) -> dict[str, tuple[float, float]]:
        """Cases whose latest Dice is more than ``tolerance`` below their best earlier one."""
        found = {}
        for case, by_round in self.scores.items():
            ordered = [by_round[r] for r in sorted(by_round)]
            if len(ordered) > 1 and max(ordered[:-1]) - ordered[-1] > tolerance:
                found[case] = (max(ordered[:-1]), ordered[-1])
        return found

    def table(self) -> tuple[list[str], list[list]]:
        """Header and rows: case, Dice per round (None where not scored), change from best."""
        header = ["case", *[f"round {n}" for n in range(1, self.current + 1)], "change"]
        rows = []
        for case, by_round in self.scores.items():
            values = [by_round.get(n) for n in range(1, self.current + 1)]
            scored = [by_round[r] for r in sorted(by_round)]
            change = scored[-1] - max(scored[:-1]) if len(scored) > 1 else None
            rows.append([case, *values, change])
        return header, rows


SCORE_HEADER = ["segment", "Dice", "HD95 (mm)", "volume (mL)", "reference volume (mL)"]


def score_rows(scores: Sequence[Mapping], mean: Mapping) -> tuple[list[str], list[list]]:
    """The Evaluate table: one row per label (``metrics.LabelScore`` as dicts), then the mean.

    A label the reference does not contain is marked and left out of the mean (as
    ``metrics.mean_scores`` does).
    """
    rows = [[s["name"] + ("" if s.get("present", True) else " (not in reference)"),
             s["dice"], s["hd95_mm"], s["volume_pred_ml"], s["volume_ref_ml"]] for s in scores]
    rows.append([f"mean of {mean.get('labels', len(scores))}", mean.get("dice"),
                 mean.get("hd95_mm"), None, None])
    return list(SCORE_HEADER), rows

