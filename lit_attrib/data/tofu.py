"""TofuDataModule: TOFU's forget/retain layout (Maini et al. 2024) over any QA data, built from indices."""

from __future__ import annotations

from typing import Literal

import datasets
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lit_attrib.data.text import TextDataModule
from lit_attrib.errors import DataError

__all__ = ["FORGET_SPLITS", "TofuDataModule", "forget_retain_rows"]

FORGET_SPLITS = {"forget01": 1, "forget05": 5, "forget10": 10}
RETAIN_SPLITS = {"retain99": 1, "retain95": 5, "retain90": 10}


def forget_retain_rows(num_rows: int, percent: int, groups: list | None = None) -> tuple[list[int], list[int]]:
    """TOFU's layout: the forget set is the **last** ``percent`` % of the authors (rows of the last
    groups, in order of first appearance; of the last rows when there are no groups), the retain set
    is everything before. TOFU's ``forget10`` is then rows 3600–3999 of ``full`` and ``retain90`` rows
    0–3599. At least one group is forgotten.
    """
    if groups is None:
        count = max(1, round(num_rows * percent / 100))
        return list(range(num_rows - count, num_rows)), list(range(num_rows - count))
    order = list(dict.fromkeys(groups))  # first appearance
    forgotten = set(order[len(order) - max(1, round(len(order) * percent / 100)):])
    forget = [i for i, group in enumerate(groups) if group in forgotten]
    return forget, [i for i, group in enumerate(groups) if group not in forgotten]


class TofuDataModule(TextDataModule):
    """TOFU-style unlearning data: fine-tune on every row, then analyse a forget set against a retain set.

    ``forget_dataloader()`` and ``retain_dataloader()`` (whole examples) feed
    ``TokenInfluenceCallback``'s direction; ``predict_split``/``query_split`` may also be ``forget``
    or ``retain``. The splits are generated from indices as seed 000 does: ``forgetNN`` is the last
    NN % of the authors and ``retainMM`` the authors outside ``forget{100-MM}``; with the hub's
    ``locuslab/TOFU`` (subset ``full``) they equal its ``forget10``/``retain90`` etc. configurations.
    The shipped fictitious-facts data (``data/facts/facts.jsonl``, ``group_column: person``) gets the
    same layout, so everything runs offline.

    Args:
        path: ``locuslab/TOFU`` (hub) or a local QA file.
        tokenizer: tokenizer hub id or local folder.
        subset: hub configuration of the full data (``full`` for TOFU).
        forget_split: ``forget01``, ``forget05`` or ``forget10``.
        retain_split: ``retain99``, ``retain95`` or ``retain90``; default the complement of ``forget_split``.
        group_column: column naming each row's author (whole authors are forgotten); ``null`` counts rows.
        val_size: validation rows (TOFU fine-tunes on all rows: default 0).
        predict_split: rows of ``predict`` (default the forget set).
        query_split: rows of ``query_dataloader`` (default the forget set).
        **kwargs: every other :class:`TextDataModule` argument.
    """

    def __init__(
        self,
        tokenizer: str,
        path: str = "locuslab/TOFU",
        subset: str | None = "full",
        forget_split: Literal["forget01", "forget05", "forget10"] = "forget10",
        retain_split: Literal["retain99", "retain95", "retain90"] | None = None,
        group_column: str | None = None,
        val_size: int | float = 0,
        predict_split: str = "forget",
        query_split: str = "forget",
        **kwargs,
    ) -> None:
        if forget_split not in FORGET_SPLITS:
            raise DataError(f"forget_split must be one of {list(FORGET_SPLITS)}; got '{forget_split}'")
        if retain_split is not None and retain_split not in RETAIN_SPLITS:
            raise DataError(f"retain_split must be one of {list(RETAIN_SPLITS)} (or null); got '{retain_split}'")
        super().__init__(path=path, tokenizer=tokenizer, subset=subset, val_size=val_size,
                         predict_split=predict_split, query_split=query_split, **kwargs)

    def _extra_splits(self, source: datasets.Dataset) -> dict[str, list[int]]:
        hp = self.hparams
        groups = None
        if hp.group_column is not None:
            if hp.group_column not in source.column_names:
                raise DataError(f"group_column '{hp.group_column}' is not a column of '{hp.path}'; its columns are "
                                f"{source.column_names}")
            groups = source[hp.group_column]
        forget, _ = forget_retain_rows(len(source), FORGET_SPLITS[hp.forget_split], groups)
        retain_percent = RETAIN_SPLITS[hp.retain_split or "retain" + f"{100 - FORGET_SPLITS[hp.forget_split]:02d}"]
        _, retain = forget_retain_rows(len(source), retain_percent, groups)
        if overlap := set(forget) & set(retain):
            rank_zero_warn(f"{hp.forget_split} and {hp.retain_split} share {len(overlap)} rows (the retain split is not "
                           f"the forget split's complement), so the direction d partly cancels")
        if not forget or not retain:
            raise DataError(f"{hp.forget_split} of {len(source)} rows leaves an empty forget or retain set; use more rows")
        rank_zero_info(f"TofuDataModule: {hp.forget_split} = {len(forget)} rows, "
                       f"{hp.retain_split or 'retain'} = {len(retain)} rows")
        return {"forget": forget, "retain": retain}

    def forget_dataloader(self) -> DataLoader:
        """The forget set as whole examples."""
        return self.split_dataloader("forget")

    def retain_dataloader(self) -> DataLoader:
        """The retain set as whole examples."""
        return self.split_dataloader("retain")
