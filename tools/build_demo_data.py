"""Builds the shipped demo dataset (mlembed_jax/demo_data/) from Babel's CLDR data.

Three small datasets, one per task type, in 18 languages and 8 scripts:
  cldr_names      retrieval: a territory / language / currency named in language A -> the
                  same entity named in language B; hard negatives are other entities of the
                  same kind named in B, preferring names that start alike.
  cldr_kinds      clustering: a name -> another name of the same kind (territory, language,
                  currency, month, weekday, script) in the same language; negatives are names
                  of other kinds.
  cldr_calendar   classification: a month or weekday name in any language -> its English
                  label; the negative is another label of the same calendar kind.
It then trains the demo's byte-level BPE tokenizer on these texts and prepares the tokenised
form with tools/prepare_data's code. Output is deterministic for a given Babel version.

  python tools/build_demo_data.py [--out mlembed_jax/demo_data]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LANGS = "en de fr es it pt nl pl sv tr ru uk el ar hi zh ja ko".split()
LATIN = {"en", "de", "fr", "es", "it", "pt", "nl", "pl", "sv", "tr"}
SPECIALS = ["<|endoftext|>", "<|im_end|>"]  # pad = 0, eos = 1 (like Qwen3's <|im_end|>)
VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 128


def load_names():
    from babel import Locale

    locs = {lang: Locale.parse(lang) for lang in LANGS}

    def common(attr, keep):
        keys = None
        for loc in locs.values():
            ks = {k for k, v in getattr(loc, attr).items() if keep(k) and v}
            keys = ks if keys is None else keys & ks
        return sorted(keys)

    kinds = {
        "territory": common("territories", lambda k: len(k) == 2 and k.isalpha()
                            and k not in ("ZZ", "XA", "XB", "EU", "EZ", "UN", "QO")),
        "language": common("languages", lambda k: len(k) == 2),
        "currency": common("currencies", lambda k: len(k) == 3),
        "script": common("scripts", lambda k: len(k) == 4),
    }
    names = {kind: {k: {lang: getattr(locs[lang], attr)[k] for lang in LANGS} for k in keys}
             for (kind, keys), attr in zip(kinds.items(),
                                           ("territories", "languages", "currencies", "scripts"))}
    names["month"] = {m: {lang: locs[lang].months["format"]["wide"][m] for lang in LANGS}
                      for m in range(1, 13)}
    names["weekday"] = {d: {lang: locs[lang].days["format"]["wide"][d] for lang in LANGS}
                        for d in range(7)}
    abbrev = {"month": {m: {lang: locs[lang].months["format"]["abbreviated"][m]
                            for lang in LANGS} for m in range(1, 13)},
              "weekday": {d: {lang: locs[lang].days["format"]["abbreviated"][d]
                              for lang in LANGS} for d in range(7)}}
    return names, abbrev


def pick_pair(rng: random.Random):
    """Query / document languages: a third with English, a third within one script, a third
    anywhere. Same-script and English pairs give a tiny model something learnable."""
    u = rng.random()
    if u < 1 / 3:
        other = rng.choice([lang for lang in LANGS if lang != "en"])
        return ("en", other) if rng.random() < 0.5 else (other, "en")
    if u < 2 / 3:
        a = rng.choice(sorted(LATIN) + ["ru", "uk"])
        pool = sorted(LATIN - {a}) if a in LATIN else [x for x in ("ru", "uk") if x != a]
        return a, rng.choice(pool)
    a, b = rng.sample(LANGS, 2)
    return a, b


def build_retrieval(names, rng, negatives=12):
    rows = []
    for kind in ("territory", "language", "currency"):
        ents = names[kind]
        keys = sorted(ents)
        per_entity = 5 if kind == "territory" else 3
        for k in keys:
            seen = set()
            for _ in range(per_entity):
                a, b = pick_pair(rng)
                q, pos = ents[k][a], ents[k][b]
                if (q, pos) in seen or q == pos:
                    continue
                seen.add((q, pos))
                others = [o for o in keys if o != k and ents[o][b] != pos]
                alike = [o for o in others if ents[o][b][:1].lower() == pos[:1].lower()]
                rng.shuffle(alike)
                chosen = alike[: negatives // 2]
                rest = [o for o in others if o not in chosen]
                chosen += rng.sample(rest, negatives - len(chosen))
                rng.shuffle(chosen)
                rows.append({"query": q, "passage": pos,
                             **{f"negative_{i + 1}": ents[o][b] for i, o in enumerate(chosen)}})
    return rows


def build_clustering(names, rng, samples=900, negatives=10):
    kinds = sorted(names)
    rows = []
    while len(rows) < samples:
        kind = rng.choice(kinds)
        lang = rng.choice(LANGS)
        a, b = rng.sample(sorted(names[kind]), 2)
        q, pos = names[kind][a][lang], names[kind][b][lang]
        if q == pos:
            continue
        negs = []
        for i in range(negatives):
            other = kinds[(kinds.index(kind) + 1 + i % (len(kinds) - 1)) % len(kinds)]
            negs.append(names[other][rng.choice(sorted(names[other]))][lang])
        rows.append({"query": q, "passage": pos,
                     **{f"negative_{i + 1}": n for i, n in enumerate(negs)}})
    return rows


def build_classification(names, abbrev, rng):
    rows, seen = [], set()
    for kind in ("month", "weekday"):
        labels = {k: names[kind][k]["en"] for k in names[kind]}
        for table in (names[kind], abbrev[kind]):
            for k in sorted(table):
                for lang in LANGS:
                    q = table[k][lang]
                    if q in seen:
                        continue
                    seen.add(q)
                    neg = rng.choice([v for j, v in labels.items() if j != k])
                    rows.append({"query": q, "passage": labels[k], "negative_1": neg})
    return rows


def train_tokenizer(texts, out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    eos = tok.token_to_id("<|im_end|>")
    assert tok.token_to_id("<|endoftext|>") == 0 and eos == 1, "special token ids moved"
    # A plain tokenizer(text) appends EOS, so HF / sentence-transformers see training's ids.
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|im_end|>", pair="$A <|im_end|> $B <|im_end|>",
        special_tokens=[("<|im_end|>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_max_length=MODEL_MAX_LENGTH,
                                   padding_side="right")
    fast.save_pretrained(out_dir)
    # Name the class both transformers 4.x and 5.x know (5.x aliases it to its backend class).
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return fast


def write_parquet(rows, path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = list(rows[0])
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in cols}), path)


README = """# Demo data: multilingual names from the Unicode CLDR (via Babel)

Small, real multilingual data for the demo training and the tests, built by
`tools/build_demo_data.py` from the CLDR locale data shipped in the Babel package
(Babel {babel_version}). Languages ({n_langs}): {langs}. Scripts: Latin, Cyrillic, Greek,
Arabic, Devanagari, Han, Japanese kana, Hangul.

| dataset | task type | samples | what it is |
|---|---|---|---|
{table}

Layout: `raw/<name>.parquet` (columns query, passage, negative_1..K), `manifest.json`
(task type per dataset), `tokenizer/` (a byte-level BPE tokenizer trained on these texts:
vocab {vocab}, `<|endoftext|>` = 0 is padding, `<|im_end|>` = {eos} is EOS and is appended to
every text), `prepared/` (the output of `tools/prepare_data.py` with max_seq_length
{max_len}). The held-out split is not a separate file: the pipeline holds out a seeded share of
each dataset (data.validation_fraction, at least data.min_validation_samples rows).

## License
- The texts are CLDR data: Copyright (c) 1991-2025 Unicode, Inc. Distributed under the
  Unicode License v3 (https://www.unicode.org/license.txt), which permits use, copying,
  modification and redistribution with this notice.
- Babel (the package they were read from) is Copyright (c) 2013-2025 by the Babel Team,
  BSD 3-Clause license.
- The derived datasets, manifest and tokenizer here are released under the same terms.
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("mlembed_jax", "demo_data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_seq_length", type=int, default=64)
    args = ap.parse_args(argv)

    import babel

    from mlembed_jax.data.prepare import prepare_data

    rng = random.Random(args.seed)
    names, abbrev = load_names()
    datasets = {
        "cldr_names": ("retrieval", build_retrieval(names, rng),
                       "a territory/language/currency named in language A -> the same "
                       "entity named in language B"),
        "cldr_kinds": ("clustering", build_clustering(names, rng),
                       "a name -> another name of the same kind (territory, language, "
                       "currency, script, month, weekday) in the same language"),
        "cldr_calendar": ("classification", build_classification(names, abbrev, rng),
                          "a month/weekday name (wide or abbreviated) in any language -> its "
                          "English label"),
    }
    manifest = {"cldr_names": {"task_type": "retrieval"},
                "cldr_kinds": {"task_type": "clustering"},
                "cldr_calendar": {"task_type": "classification",
                                  "query_prefix": "calendar: "}}

    out = args.out
    for sub in ("raw", "tokenizer", "prepared"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(os.path.join(out, "raw"), exist_ok=True)
    texts = []
    for name, (_, rows, _) in datasets.items():
        write_parquet(rows, os.path.join(out, "raw", f"{name}.parquet"))
        for r in rows:
            texts.extend(v for v in r.values())
    texts.append(manifest["cldr_calendar"]["query_prefix"])
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    tok = train_tokenizer(texts, os.path.join(out, "tokenizer"))
    prepare_data(os.path.join(out, "raw"), os.path.join(out, "manifest.json"),
                 os.path.join(out, "tokenizer"), os.path.join(out, "prepared"),
                 max_seq_length=args.max_seq_length, workers=1)
    table = "\n".join(f"| {n} | {t} | {len(rows)} | {what} |"
                      for n, (t, rows, what) in datasets.items())
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README.format(babel_version=babel.__version__, n_langs=len(LANGS),
                              langs=", ".join(LANGS), table=table, vocab=len(tok),
                              eos=tok.eos_token_id, max_len=args.max_seq_length))
    print(f"tokenizer: vocab {len(tok)}, eos id {tok.eos_token_id}; wrote {out}")


if __name__ == "__main__":
    main()
