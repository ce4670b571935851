"""The notebooks of the project, each declared once: its name (notebook file = metrics file stem)
and the notebooks whose outputs it reads. The pipeline runs them in this order, the report reads
their metrics, `helpers.train` runs their trainings.

T2 before T3 before T4: T3 reads T2's metrics for the gap, T4 reads T3's selected fashion and
checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    name: str  # notebook stem = metrics file stem
    needs: tuple[str, ...] = ()

    @property
    def task(self) -> str:
        return self.name.split("_")[0]


STEPS = (
    Step("T1_custom_cnn"),
    Step("T2_resnet18"),
    Step("T3_cubs_resnet18", ("T2_resnet18",)),
    Step("T4_cars196_retrieval", ("T3_cubs_resnet18",)),
    Step("E1_metric_losses"),
    Step("E2_stl10_layerwise"),
)
