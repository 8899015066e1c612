"""The `fusenet` params block: FuseNet's width and initialisation per dataset (official-mst-spec.md §3.5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.params import BlockError, each_value


@dataclass(frozen=True)
class FuseNetParams:
    """`width`: per dataset, the multiplier of every channel count (1 = the paper's FuseNet; the embedded
    stand-in uses a narrow one so that a CPU trains it). `init`: `authors` = the authors' constructor, which
    copies VGG16's ImageNet encoder weights and then re-initialises every layer (xavier-normal gain 0.02,
    quirk Q12), so FuseNet trains from scratch; `vgg16` = FuseNet's intent, the copied encoder kept (needs
    the file). `vgg16_weights`: a local torchvision `vgg16-397923af.pth`, or `none` (never downloaded; with
    `authors` the copy is overwritten anyway)."""

    width: dict[str, float] = field(metadata=each_value(lambda v: 0 < v <= 1, "a number in (0, 1]"))
    init: Literal["authors", "vgg16"]
    vgg16_weights: str

    def validate(self) -> None:
        if self.init == "vgg16" and self.weights_path is None:
            raise BlockError("vgg16_weights", "init: vgg16 keeps VGG16's ImageNet encoder weights and needs the "
                                              "local file (torchvision's vgg16-397923af.pth); got none")

    @property
    def weights_path(self) -> Path | None:
        return None if self.vgg16_weights.lower() == "none" else Path(self.vgg16_weights)

    def options(self, dataset: str) -> dict[str, Any]:
        """The FuseNet builders' options for `dataset` (KeyError naming the missing width entry)."""
        if dataset not in self.width:
            raise KeyError(f"fusenet.width.{dataset} is missing (the channel multiplier of {dataset}'s FuseNets)")
        return {"width": self.width[dataset], "init": self.init, "vgg16_weights": self.weights_path}
