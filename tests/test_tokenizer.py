import random

import pytest

from rwkv_playground import LoadError
from rwkv_playground.tokenizer import HFTokenizer, load_tokenizer

TEXTS = [
    "Hello world! This is RWKV, a recurrent language model.",
    "\n\nBob: Can you help to write a blog-post about RNNs?\n\nAlice: Sure",
    "中文分词测试：人工智能正在改变世界。日本語のテキストも。한국어 문장.",
    "emoji 🤖🚀👩‍👩‍👧‍👦 and combining é vs é, math ∑∫√, tabs\tand  spaces   ",
    "def f(x):\n    return x ** 2  # code\r\n",
    "",
    " ",
    "ÿ\x00\x01\x7f control chars",
]


def random_text(rng, n=300):
    alphabet = "abcdefghijklmnopqrstuvwxyz ABC\n.,!?0123456789éüß中文字🙂😀ñ—“”\t"
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_world_tokenizer_matches_rwkv_package(world_tokenizer, world_vocab_path):
    trie = pytest.importorskip("rwkv.rwkv_tokenizer", reason="rwkv pip package is a test dependency")
    ref = trie.TRIE_TOKENIZER(str(world_vocab_path))
    rng = random.Random(0)
    texts = TEXTS + [random_text(rng) for _ in range(30)]
    for text in texts:
        ids = world_tokenizer.encode(text)
        assert ids == ref.encode(text), text
        assert world_tokenizer.decode(ids) == text
    # arbitrary id sequences, including ones that cut UTF-8 characters (invalid UTF-8 bytes)
    for _ in range(50):
        ids = [rng.randrange(1, 65530) for _ in range(rng.randrange(1, 20))]
        assert world_tokenizer.decode_bytes(ids) == ref.decodeBytes(ids)
    # ids 1..65529 are in the file; World models pad their embedding to 65536 rows
    assert world_tokenizer.vocab_size == 65530


def test_world_partial_utf8_is_visible_in_bytes(world_tokenizer):
    ids = world_tokenizer.encode("é")
    byte_ids = [world_tokenizer.encode(chr(b))[0] if b < 128 else None for b in "é".encode()]
    assert world_tokenizer.decode_bytes(ids) == "é".encode()
    assert byte_ids  # bytes >= 0x80 are single tokens in the World vocab:
    raw = "é".encode()
    single = [i for i in range(1, 257) if world_tokenizer.decode_bytes([i]) == raw[:1]]
    assert single and world_tokenizer.decode([single[0]]) == "\ufffd"


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory):
    """A byte-level BPE in the same JSON format as 20B_tokenizer.json, trained on the spot."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(1)
    tok.train_from_iterator([random_text(rng, 2000) for _ in range(20)] + TEXTS, trainer)
    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_roundtrip_and_bytes(small_bpe):
    tok = load_tokenizer(small_bpe)
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 0
    rng = random.Random(2)
    for text in TEXTS + [random_text(rng) for _ in range(10)]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # per-token bytes concatenate to the text's bytes (what streaming relies on)
        assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode("utf-8")


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(LoadError, match="not found"):
        load_tokenizer(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(LoadError):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "bad.txt").write_text("this is not a vocab\n")
    with pytest.raises(LoadError, match="line 1"):
        load_tokenizer(tmp_path / "bad.txt")
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(LoadError, match="unknown tokenizer type"):
        load_tokenizer(tmp_path / "x.bin")
