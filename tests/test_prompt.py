"""The prompt layout must be token-for-token what the original builds."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch

from model.prompt import IGNORE, MEDIA, answer_text, assemble, layout_row
from model.tokenizer import ADDED_TOKENS, PromptTokenizer


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
    emb = torch.nn.Embedding(len(tok), 8)
    batch = assemble([lay], torch.randn(3, 8), emb, tok.pad_id, 512)
    labels = batch.labels[0].tolist()
    assert labels[: lay.target_start] == [IGNORE] * lay.target_start
    assert labels[lay.target_start :] == sp.encode("Calm piano.\n###")


def test_placeholder_count_must_match_media(tok):
    with pytest.raises(ValueError, match="2 media placeholder"):
        layout_row(tok, "<Audio><Image>", "x", [3])


def test_assemble_places_media_pads_and_truncates(tok):
    emb = torch.nn.Embedding(len(tok), 8)
    short = layout_row(tok, "<Image>", "a", [1], output="b")
    long = layout_row(tok, "Hi <Audio>", "a longer instruction here", [3], output="c")
    media = torch.randn(4, 8)
    batch = assemble([short, long], media, emb, tok.pad_id, 512)
    n = [len(short.ids), len(long.ids)]
    assert batch.embeds.shape == (2, max(n), 8)
    assert torch.equal(batch.embeds[0, 0], media[0])
    first = long.ids.index(MEDIA)
    assert torch.equal(batch.embeds[1, first : first + 3], media[1:])
    assert batch.attention_mask.sum(1).tolist() == n
    pad = emb(torch.tensor(tok.pad_id))
    assert torch.equal(batch.embeds[0, n[0] :], pad.expand(max(n) - n[0], 8))
    assert (batch.labels[0, n[0] :] == IGNORE).all()
    cut = assemble([short, long], media, emb, tok.pad_id, 7)
    assert cut.embeds.shape[1] == 7 and cut.lengths.tolist() == [min(7, x) for x in n]


def test_left_padding_is_right_padding_shifted(tok):
    emb = torch.nn.Embedding(len(tok), 8)
    rows = [layout_row(tok, "<Image>", "a", [1]), layout_row(tok, "Hi <Image>", "much longer words", [1])]
    media = torch.randn(2, 8)
    right = assemble(rows, media, emb, tok.pad_id, 512)
    left = assemble(rows, media, emb, tok.pad_id, 512, left_pad=True)
    width = right.embeds.shape[1]
    for b, n in enumerate(right.lengths.tolist()):
        assert torch.equal(left.embeds[b, width - n :], right.embeds[b, :n])
        assert left.attention_mask[b].tolist() == [0] * (width - n) + [1] * n


def test_fusion_sees_only_its_own_input_segment(tok):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(len(tok), 16)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    fusion = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    rows = [layout_row(tok, "<Audio>", "short", [3]), layout_row(tok, "Some text then <Audio>", "other", [3])]
    media = torch.randn(6, 16)
    with torch.no_grad():
        both = assemble(rows, media, emb, tok.pad_id, 512, fusion=fusion)
        alone = [
            assemble([r], media[3 * i : 3 * i + 3], emb, tok.pad_id, 512, fusion=fusion) for i, r in enumerate(rows)
        ]
        plain = assemble(rows, media, emb, tok.pad_id, 512)
    for b, row in enumerate(rows):
        n = len(row.ids)
        torch.testing.assert_close(both.embeds[b, :n], alone[b].embeds[0, :n])
        # fusion changes the input segment and leaves the instruction untouched
        assert not torch.allclose(both.embeds[b, : row.input_len], plain.embeds[b, : row.input_len])
        assert torch.equal(both.embeds[b, row.input_len : n], plain.embeds[b, row.input_len : n])


def test_answer_is_text_before_first_stop():
    assert answer_text("A calm song.\n### Human: more\n###") == "A calm song."
    assert answer_text("no stop") == "no stop"
