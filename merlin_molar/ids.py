"""The item id conventions every layer shares, with no dependency: Categorify's reserved ids and the name of
the item sequence column."""

ITEM_SEQUENCE = "item_id-list"
# Categorify reserves 0 (padding), 1 (null) and 2 (out-of-vocabulary); real items start at FIRST_ITEM_ID.
PAD_ID = 0
OOV_ID = 2
FIRST_ITEM_ID = 3
