"""Print the segmentation table of ``engine/frontend/README.md``.

    python -m engine.frontend.segment_demo [--tokenizer DIR]

Each stream is fed one Qwen token at a time (as an LLM streams it, multi-byte characters kept whole)
into a default ``StreamingSegmenter`` without ``poll``; the table shows the cuts and after how many
input characters the first segment was released.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from engine.frontend.segmenter import StreamingSegmenter
from engine.frontend.tokenizer import CosyVoice2Tokenizer, write_tokenizer_files

STREAMS = [
    ("en chat", "Sure! The total comes to $1,249.99, which includes a 3.5% fee. You can pay by Jan 15, 2025 at "
                "https://pay.example.com/inv?id=42 or email billing@example.com if you have questions."),
    ("en markdown", "## Quick answer\n\nYes, you **can** do that. Here's how:\n\n1. Open the `settings` menu.\n"
                    "2. Click [Advanced](https://x.io/adv) 🚀\n\n```bash\nexport X=1\n```\nThat's it, good luck!"),
    ("zh chat", "好的，我来帮你查一下。明天北京的最高气温是23.5度，最低气温12度，降水概率为30%。"
                "建议你带一把伞，出门注意保暖哦😊！"),
    ("zh markdown", "### 总结\n\n- **价格**：¥299起\n- **发布日期**：2024年9月10日\n\n详情请访问 https://example.cn/p/123 了解更多。"),
    ("mixed", "这个 API 的 rate limit 是每分钟 60 次，超过之后会返回 HTTP 429 错误。You should retry after 1.5 seconds."),
    ("no punctuation", "so what I was trying to say is that we should probably meet sometime next week to go over "
                       "the numbers together and decide what to do"),
]


def token_fragments(tok: CosyVoice2Tokenizer, text: str) -> list[str]:
    """``text`` cut at Qwen token boundaries (a token ending inside a UTF-8 character waits for the next)."""
    ids, frags, prev = tok.encode(text), [], ""
    for k in range(1, len(ids) + 1):
        cur = tok.decode(ids[:k])
        if cur.endswith("\ufffd"):
            continue
        frags.append(cur[len(prev):])
        prev = cur
    return frags


def table(tok: CosyVoice2Tokenizer) -> str:
    lines = ["| stream | input chars | fragments (Qwen tokens) | first segment left after N input chars "
             "| segments | segments (‖ = cut) |", "|---|---|---|---|---|---|"]
    for name, text in STREAMS:
        frags = token_fragments(tok, text)
        seg, consumed, first_at, segs = StreamingSegmenter(), 0, None, []
        for f in frags:
            consumed += len(f)
            out = seg.feed(f, now=0.0)
            if out and first_at is None:
                first_at = consumed
            segs += out
        segs += seg.end()
        cuts = " ‖ ".join(s.strip() for s in segs).replace("|", "&#124;")
        lines.append(f"| {name} | {len(text)} | {len(frags)} | {first_at or len(text)} | {len(segs)} | {cuts} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", help="a CosyVoice-BlankEN directory (default: written to a temp dir)")
    a = ap.parse_args()
    d = Path(a.tokenizer) if a.tokenizer else write_tokenizer_files(Path(tempfile.mkdtemp()) / "CosyVoice-BlankEN")
    print(table(CosyVoice2Tokenizer(d)))


if __name__ == "__main__":
    main()
