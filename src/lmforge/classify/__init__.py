"""Task heads on the one Trainer: text classification (binary, multi-class, multi-label) and BIO token tagging.

    lmforge classify train --model DIR --data FILE --text-field text --label-field label --out runs/clf
    lmforge classify predict --model runs/clf/best --data new.jsonl
    lmforge classify eval --model runs/clf/best --data test.csv --json
"""
