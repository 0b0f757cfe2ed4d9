"""A history longer than the model's window (issue 31's bad case): `recommend` in process and the exported model
on the real Triton server give the same top-k, for Molar and SASRec, and no item of the history comes back,
also one older than the window. The history is built so that its oldest item is the window's own top-1, the
answer a scorer that forgets the items before the window would give."""
import numpy as np
import pytest
import torch

from merlin_molar.cli import main
from merlin_molar.models.sasrec import SASRecConfig, sasrec_model
from merlin_molar.persistence import save_model
from merlin_molar.pipeline import recommend as recommend_in_process
from merlin_molar.serving import TritonServer, export_triton
from merlin_molar.serving.client import connect, recommend
from merlin_molar.training import TrainConfig, make_trainer

TOP_K, MAX_BATCH = 10, 16  # as the `repository` fixture exports


@pytest.fixture(scope="module")
def sasrec_repository(ml100k_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("sasrec-long")
    torch.manual_seed(0)
    config = SASRecConfig(max_length=20, d_model=16, n_layers=1)
    trainer = make_trainer(sasrec_model(ml100k_prepared.schema, config), ml100k_prepared, out / "run",
                           TrainConfig(epochs=1, batch_size=128, logging_steps=1000))
    trainer.train()
    saved = save_model(trainer.model, out / "model", "sasrec", config, ml100k_prepared.schema)
    return saved, export_triton(saved, ml100k_prepared.root, out / "repo", top_k=TOP_K, max_batch_size=MAX_BATCH)


def long_histories(model_dir, prepared, vocabulary, raw_histories):
    """Each a real 20-item window with the window's own top-1 prepended: 21 items, the oldest one the answer a
    window-only exclusion would put first; plus the test's 52-item history."""
    out = []
    for window in (raw_histories[0], raw_histories[5]):
        first = recommend_in_process(model_dir, prepared, [window], top_k=1)["item_id"].iloc[0]
        out.append([first, *window])
    out.append(raw_histories[0] + raw_histories[3] + raw_histories[8])
    return out


@pytest.mark.parametrize("kind", ["molar", "sasrec"])
def test_a_history_longer_than_the_window_gets_the_served_answer(kind, molar_saved, repository, sasrec_repository,
                                                                  ml100k_prepared, vocabulary, raw_histories,
                                                                  capsys):
    model_dir, repo = (molar_saved, repository) if kind == "molar" else sasrec_repository
    histories = long_histories(model_dir, ml100k_prepared, vocabulary, raw_histories)
    assert all(len(h) > 20 for h in histories)
    in_process = recommend_in_process(model_dir, ml100k_prepared, histories, top_k=TOP_K)
    with TritonServer(repo) as server:
        served_ids, served_scores = recommend(connect(server.grpc_url, "grpc"), histories)
    for row, history in enumerate(histories):
        mine = in_process[in_process["history"] == row]
        assert not set(history) & set(mine["item_id"].tolist()), "a history item came back in process"
        assert not set(history) & set(served_ids[row].tolist()), "a history item came back from the server"
        np.testing.assert_array_equal(served_ids[row], mine["item_id"].to_numpy())
        np.testing.assert_allclose(served_scores[row], mine["score"].to_numpy(), rtol=1e-5, atol=1e-5)
    # the command line prints the same list
    capsys.readouterr()
    assert main(["recommend", "--model-dir", str(model_dir), "--prepared", str(ml100k_prepared.root),
                 "--history", ",".join(map(str, histories[0])), "--top-k", "3"]) == 0
    printed = [line.split()[2] for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert printed == [str(i) for i in served_ids[0][:3]]


def test_the_reference_scorer_agrees(molar_saved, ml100k_prepared, vocabulary, raw_histories, in_process):
    """The in-process answer for a long history is the T4Rec forward on the last 20 items, every history item
    masked (the reference of the other served tests)."""
    histories = long_histories(molar_saved, ml100k_prepared, vocabulary, raw_histories)
    want_ids, _ = in_process(histories)
    got = recommend_in_process(molar_saved, ml100k_prepared, histories, top_k=TOP_K)
    for row in range(len(histories)):
        np.testing.assert_array_equal(got[got["history"] == row]["item_id"].to_numpy(), want_ids[row])
