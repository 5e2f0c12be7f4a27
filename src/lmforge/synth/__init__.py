"""Synthetic instruction data through any model client: self-instruct and Evol-Instruct, with ROUGE-L novelty,
the papers' heuristics and elimination rules, and the data stage's dedup and contamination checks.

    lmforge synth self-instruct --seed-tasks builtin:seeds-en --endpoint http://localhost:8000/v1 --num 100 --out runs/si
    lmforge synth evol-instruct --seed-tasks runs/si/data/alpaca.jsonl --model DIR --rounds 3 --out runs/evol
"""
