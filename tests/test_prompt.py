"""The prompt layout must be token-for-token what the original builds; batches must embed it exactly."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch

from model.network.deepresonance import embed_batch
from model.text.prompt import IGNORE, MEDIA, PLACEHOLDERS, TAGS, RowLayout, answer_text, batch_ids, layout_row
from model.text.tokenizer import ADDED_TOKENS, PromptTokenizer


@pytest.fixture(scope="module")
def tok(tiny_layout) -> PromptTokenizer:
    return PromptTokenizer.from_dir(tiny_layout.delta_dir("alpha"))


@pytest.fixture(scope="module")
def sp(tiny_layout) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_layout.vicuna / "tokenizer.model"))


def instruction_ids(sp, instruction):
    return sp.encode("### Human: " + instruction + "\n### Assistant: ")


def test_pieces_tokenized_alone_like_raw_sentencepiece(tok, sp):
    # legacy slow tokenizer == sentencepiece on each piece: a lone space is two "▁" pieces
    assert [sp.id_to_piece(i) for i in tok.encode(" ")] == ["▁", "▁"]
    for text in [" and then answer.", "Listen to this: ", "### Human: hi\n### Assistant: "]:
        assert tok.encode(text) == sp.encode(text)


def test_six_added_tokens_extend_the_vocabulary(tok, sp):
    assert len(tok) == sp.get_piece_size() + 6
    assert [tok.added[t] for t in ADDED_TOKENS] == list(range(sp.get_piece_size(), sp.get_piece_size() + 6))
    assert tok.encode("a <Img> b") == sp.encode("a") + [tok.added["<Img>"]] + sp.encode("b")


def test_input_starting_with_media_gets_no_bos(tok, sp):
    lay = layout_row(tok, "<Audio>", "Describe the music.", [3])
    assert lay.ids[:3] == [MEDIA] * 3
    assert lay.input_len == 3
    assert lay.ids[3:] == instruction_ids(sp, "Describe the music.")
    assert tok.bos_id not in lay.ids


def test_input_starting_with_text_gets_bos_and_pieces_split_at_media(tok, sp):
    lay = layout_row(tok, "Listen to this: <Image> and then <Audio>", "Why?", [1, 3])
    expected = [tok.bos_id] + sp.encode("Listen to this: ") + [MEDIA] + sp.encode(" and then ") + [MEDIA] * 3
    assert lay.ids[: lay.input_len] == expected
    assert lay.ids[lay.input_len :] == instruction_ids(sp, "Why?")


def test_empty_input_becomes_a_space_with_bos(tok, sp):
    lay = layout_row(tok, "", "Tell me a joke.", [])
    assert lay.ids[: lay.input_len] == [tok.bos_id] + sp.encode(" ")


def test_target_and_labels(tok, sp):
    lay = layout_row(tok, "<Audio>", "Describe.", [3], output="Calm piano.")
    assert lay.ids[lay.target_start :] == sp.encode("Calm piano.\n###")
    labels = batch_ids([lay], tok.pad_id, 512).labels[0].tolist()
    assert labels[: lay.target_start] == [IGNORE] * lay.target_start
    assert labels[lay.target_start :] == sp.encode("Calm piano.\n###")


def test_placeholder_count_must_match_media(tok):
    with pytest.raises(ValueError, match="2 media placeholder"):
        layout_row(tok, "<Audio><Image>", "x", [3])


def test_tags_invert_placeholders():
    assert TAGS == {"audio": "<Audio>", "image": "<Image>", "video": "<Video>"}
    assert {PLACEHOLDERS[tag]: tag for tag in TAGS.values()} == TAGS


# rows written out by hand: ids (MEDIA at slots), input segment length, target start
SHORT = RowLayout([MEDIA, 11, 12, 13], 1, 3)
LONG = RowLayout([1, 21, MEDIA, MEDIA, 22, 23, 24], 4, 5)
PAD = 0


def test_batch_ids_right_pads_and_labels_only_targets():
    rows = batch_ids([SHORT, LONG], PAD, 512)
    assert rows.ids.tolist() == [[MEDIA, 11, 12, 13, PAD, PAD, PAD], [1, 21, MEDIA, MEDIA, 22, 23, 24]]
    assert rows.labels.tolist() == [[IGNORE, IGNORE, IGNORE, 13, IGNORE, IGNORE, IGNORE], [IGNORE] * 5 + [23, 24]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert rows.lengths.tolist() == [4, 7] and rows.input_lens.tolist() == [1, 4]
    assert rows.keep == 7 and rows.order is None
    assert rows.sizes == (4, 7) and rows.media_slots == 3 and rows.longest_input == 4  # the host-side counts


def test_batch_ids_cuts_at_max_length_but_keeps_whole_ids():
    rows = batch_ids([SHORT, LONG], PAD, 5)
    assert rows.ids.shape == (2, 7)  # embedding and fusion see whole rows
    assert rows.keep == 5 and rows.lengths.tolist() == [4, 5] and rows.sizes == (4, 5)
    assert rows.labels.tolist() == [[IGNORE, IGNORE, IGNORE, 13, IGNORE], [IGNORE] * 5]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1] * 5]


def test_batch_ids_left_pads_by_rotating_each_row():
    rows = batch_ids([SHORT, LONG], PAD, 512, left_pad=True)
    assert rows.order.tolist() == [[4, 5, 6, 0, 1, 2, 3], list(range(7))]
    assert rows.labels.tolist() == [[IGNORE] * 3 + [IGNORE, IGNORE, IGNORE, 13], [IGNORE] * 5 + [23, 24]]
    assert rows.attention_mask.tolist() == [[0, 0, 0, 1, 1, 1, 1], [1] * 7]
    cut = batch_ids([SHORT, LONG], PAD, 5, left_pad=True)
    assert cut.order.tolist() == [[4, 0, 1, 2, 3], list(range(5))]
    assert cut.attention_mask.tolist() == [[0, 1, 1, 1, 1], [1] * 5]


def test_embed_batch_writes_media_into_slots_and_pads():
    emb = torch.nn.Embedding(30, 8)
    media = torch.randn(3, 8)
    with torch.no_grad():
        batch = embed_batch(batch_ids([SHORT, LONG], PAD, 512), media, emb)
        table = emb.weight
    assert batch.embeds.shape == (2, 7, 8)
    expected = [
        [media[0], table[11], table[12], table[13], table[PAD], table[PAD], table[PAD]],
        [table[1], table[21], media[1], media[2], table[22], table[23], table[24]],
    ]
    assert torch.equal(batch.embeds, torch.stack([torch.stack(r) for r in expected]))
    with pytest.raises(ValueError, match="3 media slots but 2 clip embeddings"):
        embed_batch(batch_ids([SHORT, LONG], PAD, 512), media[:2], emb)


def test_embed_batch_cuts_and_left_pads_the_embeddings():
    emb = torch.nn.Embedding(30, 8)
    media = torch.randn(3, 8)
    with torch.no_grad():
        right = embed_batch(batch_ids([SHORT, LONG], PAD, 512), media, emb)
        left = embed_batch(batch_ids([SHORT, LONG], PAD, 5, left_pad=True), media, emb)
    assert left.embeds.shape == (2, 5, 8)
    assert torch.equal(left.embeds[0, 1:], right.embeds[0, :4])  # the short row ends at the last column
    assert torch.equal(left.embeds[0, 0], emb.weight[PAD].detach())
    assert torch.equal(left.embeds[1], right.embeds[1, :5])  # the long row is cut


def test_fusion_sees_only_its_own_input_segment(tok):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(len(tok), 16)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    fusion = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    rows = [layout_row(tok, "<Audio>", "short", [3]), layout_row(tok, "Some text then <Audio>", "other", [3])]
    media = torch.randn(6, 16)
    with torch.no_grad():
        both = embed_batch(batch_ids(rows, tok.pad_id, 512), media, emb, fusion)
        alone = [
            embed_batch(batch_ids([r], tok.pad_id, 512), media[3 * i : 3 * i + 3], emb, fusion)
            for i, r in enumerate(rows)
        ]
        plain = embed_batch(batch_ids(rows, tok.pad_id, 512), media, emb)
    for b, row in enumerate(rows):
        n = len(row.ids)
        torch.testing.assert_close(both.embeds[b, :n], alone[b].embeds[0, :n])
        # fusion changes the input segment and leaves the instruction untouched
        assert not torch.allclose(both.embeds[b, : row.input_len], plain.embeds[b, : row.input_len])
        changed = ~torch.isclose(both.embeds[b, : row.input_len], plain.embeds[b, : row.input_len]).all(-1)
        assert changed.all()  # every position of the segment is fused, not only the shortest row's width
        assert torch.equal(both.embeds[b, row.input_len : n], plain.embeds[b, row.input_len : n])


def test_fusion_runs_before_the_cut():
    """A row longer than max_length is fused whole, then cut (the original assembles, then truncates)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(30, 16)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    fusion = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    media = torch.randn(2, 16)
    with torch.no_grad():
        whole = embed_batch(batch_ids([LONG], PAD, 512), media, emb, fusion)
        cut = embed_batch(batch_ids([LONG], PAD, 3), media, emb, fusion)
    assert torch.equal(cut.embeds[0], whole.embeds[0, :3])


def test_answer_is_text_before_first_stop():
    assert answer_text("A calm song.\n### Human: more\n###") == "A calm song."
    assert answer_text("no stop") == "no stop"
