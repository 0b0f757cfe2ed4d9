"""Data preparation: readers -> canonical tables -> NVTabular workflow -> leave-one-out splits."""
from merlin_molar.data.readers import RawDataset, read_amazon, read_dataset, read_table  # noqa: F401
from merlin_molar.data.workflow import (  # noqa: F401
    FIRST_ITEM_ID,
    ITEM_SEQUENCE,
    SPLITS,
    PreparedData,
    load_prepared,
    prepare,
)
