"""No function in src/lmforge grows past MAX_LINES: a long function is split into named steps (create_app into
routes by area, run_finetune into the steps of a run, Trainer.fit into the phases of a step).

Lines are counted as the issue counted them: from the `def` line to the function's last line (ast's lineno and
end_lineno), docstring and comments included, nested functions inside their parent. The few functions that stay
longer are listed with the reason; an entry that is no longer needed (the function got shorter, moved or went) fails
the test too, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lmforge

SRC = Path(lmforge.__file__).parent
MAX_LINES = 80

# "module path:function" -> why it stays one function
ALLOWED = {
    "export/gguf.py:read_gguf": "one pass over GGUF's bytes in the order the format lays them out (header, metadata, "
                                "tensor infos): split, the reader would hand its offset between functions",
    "export/gguf.py:import_gguf": "the reverse of the writer, one architecture's layout applied tensor by tensor into "
                                  "one StagedDirectory; the tensor-name table is already apart (GGUF_ARCH)",
    "model/hf.py:_config_from_hf": "a table of the HF config fields each family reads, one branch per family",
    "finetune/distill/cache.py:build_cache": "one resumable loop writing the teacher's shards (resume state, batch, "
                                             "forward, top-k, write) whose locals every step shares",
    "chat/render.py:_build_environment": "the Jinja environment with the extensions transformers defines, kept in "
                                         "the shape of transformers' own so the two can be compared",
    "tokenizer/bpe.py:merge_pairs": "the incremental merge loop (pair counts updated around each occurrence, a lazy "
                                    "heap), written out in one piece to be checked against HF's Word::merge",
}


def _function_lengths() -> dict[str, int]:
    lengths = {}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                key = f"{path.relative_to(SRC).as_posix()}:{node.name}"
                lengths[key] = max(lengths.get(key, 0), node.end_lineno - node.lineno + 1)
    return lengths


def test_no_function_is_longer_than_the_limit():
    too_long = {key: n for key, n in _function_lengths().items() if n > MAX_LINES and key not in ALLOWED}
    assert not too_long, (f"functions over {MAX_LINES} lines (split them into named steps, or add one to ALLOWED "
                          f"with the reason): {too_long}")


def test_the_allow_list_holds_only_what_still_needs_it():
    lengths = _function_lengths()
    stale = {key: lengths.get(key) for key in ALLOWED if lengths.get(key, 0) <= MAX_LINES}
    assert not stale, f"ALLOWED entries no longer over {MAX_LINES} lines (or gone): remove them: {stale}"


def test_the_count_sees_every_function_and_counts_as_the_issue_did():
    lengths = _function_lengths()
    # a module-level function, a method, a nested function: each found under its own name
    assert {"serve/app.py:create_app", "train/trainer.py:fit", "train/trainer.py:__init__"} <= lengths.keys()
    tree = ast.parse("def f():\n    '''doc'''\n    # why\n\n    return 1\n")
    node = tree.body[0]
    assert node.end_lineno - node.lineno + 1 == 5  # def line, docstring, comment and blank line all count
