"""The item id conventions every layer shares, with no dependency: Categorify's reserved ids and the name of
the item sequence column and the per-user evaluation columns."""

ITEM_SEQUENCE = "item_id-list"
# Each user's row number in the prepared histories: the key of the evaluation's earlier-items table.
USER_INDEX = "user_index"
# Column of the earlier-items table: the items of a user's history older than the split row's window.
EARLIER_ITEMS = "item_id-earlier"
# Categorify reserves 0 (padding), 1 (null) and 2 (out-of-vocabulary); real items start at FIRST_ITEM_ID.
PAD_ID = 0
OOV_ID = 2
FIRST_ITEM_ID = 3
