"""Derive the CLIP BPE tokenizer files shipped in ``cascade/tokenizer/``.

Source: ``open_clip/bpe_simple_vocab_16e6.txt.gz`` inside the ``open_clip_torch`` wheel on PyPI
(OpenAI's original BPE file; the wheel is only unpacked, never installed):

    pip download --no-deps open_clip_torch -d /tmp/oc
    python scripts/make_tokenizer_files.py /tmp/oc/open_clip_torch-*.whl

The script accepts the wheel or the bare ``.txt.gz``. It writes ``vocab.json`` and ``merges.txt``
in the layout transformers' ``CLIPTokenizer`` reads, with ids built the way OpenAI's
``SimpleTokenizer`` builds them:

1. the 256 byte symbols (GPT-2 byte-to-unicode table, in table order),
2. the same 256 symbols with the end-of-word marker ``</w>``,
3. one token per merge rule (the two halves joined), in file order,
4. ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

The merges used are lines 1 .. 48894 of the file (line 0 is a version header): 49152 - 256 - 2 rules,
which together with the 512 byte tokens and 2 specials make 49408 ids. The two small JSON
configuration files next to them are written by this script too (see docs/TEXT_ENCODER.md for the
pad-token decision).
"""

import argparse
import gzip
import hashlib
import json
import os
import sys
import zipfile

GZ_NAME = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# sha256 of the .gz taken from open_clip_torch 3.3.0; the file has not changed across releases.
EXPECTED_GZ_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for raw bytes, in the order their ids are assigned."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1))
        + list(range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1))
    )
    symbols = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            # Bytes without a printable glyph get code points above 255, in byte order.
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def read_gz_bytes(path: str) -> bytes:
    if path.endswith(".whl") or zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return zf.read(GZ_NAME)
    with open(path, "rb") as fh:
        return fh.read()


def build(gz_bytes: bytes) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.decompress(gz_bytes).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]
    if any(len(m) != 2 for m in merges):
        raise ValueError("merge lines must hold exactly two symbols each")
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(vocab) != 49408:
        raise ValueError(f"expected 49408 distinct tokens, got {len(vocab)} of {len(tokens)}")
    return vocab, merges


def write(out_dir: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8", newline="\n") as fh:
        json.dump(vocab, fh, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8", newline="\n") as fh:
        fh.write("#version: 0.2\n")
        fh.write("".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    for name, payload in (("special_tokens_map.json", special), ("tokenizer_config.json", config)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
            fh.write("\n")


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="open_clip_torch wheel or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", default=os.path.join(root, "cascade", "tokenizer"))
    args = parser.parse_args()

    gz_bytes = read_gz_bytes(args.source)
    digest = hashlib.sha256(gz_bytes).hexdigest()
    if digest != EXPECTED_GZ_SHA256:
        print(f"warning: source sha256 {digest} differs from the pinned {EXPECTED_GZ_SHA256}", file=sys.stderr)  # noqa: T201
    vocab, merges = build(gz_bytes)
    write(args.out, vocab, merges)
    for name in ("vocab.json", "merges.txt"):
        path = os.path.join(args.out, name)
        with open(path, "rb") as fh:
            print(f"{name}: {os.path.getsize(path)} bytes, sha256 {hashlib.sha256(fh.read()).hexdigest()}")  # noqa: T201
    print(f"{len(vocab)} tokens, {len(merges)} merges, source sha256 {digest}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
