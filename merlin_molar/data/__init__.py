"""Data preparation: readers -> canonical tables -> NVTabular workflow -> leave-one-out splits."""
from merlin_molar.data.readers import RawDataset, read_amazon, read_dataset, read_table  # noqa: F401
from merlin_molar.data.workflow import (  # noqa: F401
    SPLITS,
    PreparedData,
    load_prepared,
    prepare,
)
