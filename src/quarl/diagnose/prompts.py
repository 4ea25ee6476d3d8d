"""A built-in handful of GSM8K-style prompts (with reference solutions) for `quarl.diagnose`.

Original problems written for quarl in GSM8K's style (multi-step arithmetic, integer answers, solutions ending in
``#### N``), with verl's instruction suffix (``examples/data_preprocess/gsm8k.py``), so a diagnosis runs offline with
no dataset download. They measure logit damage, not accuracy: a handful of prompts is enough for KL / top-1 /
per-token NLL, far too few for an accuracy claim.
"""

from __future__ import annotations

INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."

_PROBLEMS = (
    ("Mia buys 3 packs of pencils with 12 pencils in each pack. She gives 9 pencils to her brother. "
     "How many pencils does she have left?",
     "Mia buys 3 * 12 = 36 pencils. After giving 9 away she has 36 - 9 = 27 pencils.\n#### 27"),
    ("A bakery sells muffins for $2 each and cookies for $1 each. Tom buys 4 muffins and 6 cookies. "
     "How much does he spend?",
     "The muffins cost 4 * 2 = 8 dollars. The cookies cost 6 * 1 = 6 dollars. In total 8 + 6 = 14 dollars.\n#### 14"),
    ("A train travels 60 miles per hour for 3 hours and then 40 miles per hour for 2 hours. "
     "How many miles does it travel in total?",
     "First it travels 60 * 3 = 180 miles. Then 40 * 2 = 80 miles. In total 180 + 80 = 260 miles.\n#### 260"),
    ("Sara has 48 stickers. She puts them equally into 6 albums and then adds 2 more stickers to each album. "
     "How many stickers are in each album?",
     "Each album gets 48 / 6 = 8 stickers. After adding 2, each album has 8 + 2 = 10 stickers.\n#### 10"),
    ("A farmer has 5 rows of apple trees with 14 trees in each row. He plants 3 more rows of 14 trees. "
     "How many apple trees does he have now?",
     "He has 5 + 3 = 8 rows. So he has 8 * 14 = 112 trees.\n#### 112"),
    ("Leo reads 15 pages a day for 4 days and 20 pages on the fifth day. His book has 100 pages. "
     "How many pages are left?",
     "He reads 15 * 4 = 60 pages, then 20 more: 60 + 20 = 80 pages. There are 100 - 80 = 20 pages left.\n#### 20"),
)

DEFAULT_PROMPTS: tuple[str, ...] = tuple(f"{q} {INSTRUCTION}" for q, _ in _PROBLEMS)
DEFAULT_REFERENCES: tuple[str, ...] = tuple(a for _, a in _PROBLEMS)
