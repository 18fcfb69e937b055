"""Builds the shipped demo dataset (mlembed_jax/demo_data/) from Babel's CLDR data.

Three small datasets, one per task type, in 18 languages and 8 scripts, over one fixed set
of entities (a seeded sample of territories, languages, currencies and scripts, plus the 12
months and 7 weekdays), each named in all 18 languages:
  cldr_names      retrieval: an entity named in language A -> the same entity named in
                  language B. Each entity gets many language pairs (rounds of a round-robin
                  schedule, no pair twice), so every name occurs in several pairs: a held-out
                  pair's two names are both seen in training, paired with other names of the
                  entity, and the pair is learnable in-domain (transitively). Hard negatives
                  are other entities named in B, half of them the most look-alike names.
  cldr_kinds      clustering: a name -> another name of the same kind (territory, language,
                  currency, script, month, weekday) in the same language; negatives are names
                  of other kinds.
  cldr_calendar   classification: a month or weekday name in any language -> its English
                  name; the negative is another English name of the same calendar kind.
The entities are kept few so that a from-scratch demo model sees every name several times
within a couple of minutes of CPU training.
It then trains the demo's byte-level BPE tokenizer on these texts and prepares the tokenised
form with tools/prepare_data's code. Output is deterministic for a given Babel version.

  python tools/build_demo_data.py [--output_dir mlembed_jax/demo_data]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil

LANGS = "en de fr es it pt nl pl sv tr ru uk el ar hi zh ja ko".split()
SPECIALS = ["<|endoftext|>", "<|im_end|>"]  # pad = 0, eos = 1 (like Qwen3's <|im_end|>)
VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 128
# The retrieval entities: a seeded sample per kind (all months and weekdays). Every name of
# every entity is a text of the retrieval data, so the clustering and classification data,
# which use the same names, are learnable in-domain too.
ENTITIES = {"territory": 20, "language": 10, "currency": 6, "script": 6, "month": 12,
            "weekday": 7}
PAIR_ROUNDS = 6  # language pairs per entity: 6 of the 17 round-robin rounds = up to 54
CLUSTERING_SAMPLES = 1200


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
    return names


def choose_entities(names, rng: random.Random, counts: dict):
    """{kind: {key: {lang: name}}}: a seeded sample of each kind's entities among those whose
    18 names are not all one string; a name that two entities share is left out of both."""
    chosen = {}
    for kind, n in counts.items():
        keys = [k for k in sorted(names[kind]) if len(set(names[kind][k].values())) > 1]
        keys = sorted(rng.sample(keys, n)) if n < len(keys) else keys
        chosen[kind] = {k: dict(names[kind][k]) for k in keys}
    owners = {}
    for kind, ents in chosen.items():
        for k, by_lang in ents.items():
            for name in set(by_lang.values()):
                owners.setdefault(name, set()).add((kind, k))
    for kind, ents in chosen.items():
        for k in ents:
            ents[k] = {lang: v for lang, v in ents[k].items() if len(owners[v]) == 1}
    return chosen


def entity_pairs(rng: random.Random, langs: list, rounds: int):
    """Ordered (query, document) language pairs for one entity: `rounds` rounds of a
    round-robin schedule of its languages (circle method, seeded order), so every language
    occurs `rounds` times, a held-out pair's two names are each seen in other pairs during
    training, and no two languages are paired twice (not even in reverse)."""
    order = langs[:]
    rng.shuffle(order)
    if len(order) % 2:
        order.append(None)  # a bye
    n = len(order)
    schedule = []
    for _ in range(n - 1):
        schedule.append([(order[i], order[n - 1 - i]) for i in range(n // 2)])
        order = [order[0], order[-1]] + order[1:-1]
    pairs = []
    for matching in rng.sample(schedule, min(rounds, len(schedule))):
        for a, b in matching:
            if a is not None and b is not None:
                pairs.append((a, b) if rng.random() < 0.5 else (b, a))
    return pairs


def _grams(text: str) -> set:
    t = f" {text.lower()} "
    return {t[i:i + 3] for i in range(len(t) - 2)} or {t}


def build_retrieval(entities, rng, rounds, negatives=12):
    """An entity named in language A -> the same entity named in language B. Negatives: other
    entities named in B, half of them the most look-alike names (shared character 3-grams,
    across kinds, e.g. a language next to its territory), half at random."""
    ents = [(kind, k) for kind in entities for k in entities[kind]]
    rows = []
    for kind, k in ents:
        seen = set()
        by_lang = entities[kind][k]
        for a, b in entity_pairs(rng, [lang for lang in LANGS if lang in by_lang], rounds):
            q, pos = by_lang[a], by_lang[b]
            if frozenset((q, pos)) in seen or q == pos:
                continue  # one pair per two strings, in either direction
            seen.add(frozenset((q, pos)))
            others = sorted({entities[ok][o][b] for ok, o in ents
                             if (ok, o) != (kind, k) and b in entities[ok][o]} - {pos, q})
            g = _grams(pos)
            alike = sorted(others, key=lambda o: (-len(g & _grams(o)) / len(g | _grams(o)), o))
            chosen = alike[: negatives // 2]
            rest = [o for o in others if o not in chosen]
            chosen += rng.sample(rest, negatives - len(chosen))
            rng.shuffle(chosen)
            rows.append({"query": q, "passage": pos,
                         **{f"negative_{i + 1}": o for i, o in enumerate(chosen)}})
    rng.shuffle(rows)
    return rows


def build_clustering(entities, rng, samples, negatives=10):
    """A name -> another name of the same kind in the same language; negatives are names of
    the other kinds in that language."""
    kinds = sorted(entities)

    def name_in(kind, lang):
        return [v[lang] for _, v in sorted(entities[kind].items()) if lang in v]

    rows = []
    while len(rows) < samples:
        kind = rng.choice(kinds)
        lang = rng.choice(LANGS)
        q, pos = rng.sample(name_in(kind, lang), 2)
        if q == pos:
            continue
        negs = []
        for i in range(negatives):
            other = kinds[(kinds.index(kind) + 1 + i % (len(kinds) - 1)) % len(kinds)]
            negs.append(rng.choice(name_in(other, lang)))
        rows.append({"query": q, "passage": pos,
                     **{f"negative_{i + 1}": n for i, n in enumerate(negs)}})
    return rows


def build_classification(entities, rng):
    """A month or weekday name in any language -> its English name; the negative is another
    English label of the same calendar kind."""
    rows, seen = [], set()
    for kind in ("month", "weekday"):
        table = entities[kind]
        labels = {k: table[k]["en"] for k in table if "en" in table[k]}
        for k in sorted(labels):
            for lang in LANGS:
                q = table[k].get(lang)
                if q is None or q in seen or q == labels[k]:
                    continue
                seen.add(q)
                neg = rng.choice([v for j, v in labels.items() if j != k])
                rows.append({"query": q, "passage": labels[k], "negative_1": neg})
    return rows


def train_tokenizer(texts, out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # A space is put before the first word, so a word has the same ids at the start of a text
    # and after a space: a name alone and after the query prefix ("calendar: <name>"). The
    # decoder takes that space off again.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
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
(Babel {babel_version}). Languages ({n_langs}): {langs}.
Scripts: Latin, Cyrillic, Greek, Arabic, Devanagari, Han, Japanese kana, Hangul.

| dataset | task type | samples | what it is |
|---|---|---|---|
{table}

All three use the names of one fixed set of {n_entities} entities, each named in all
{n_langs} languages ({n_names} distinct names). Every name occurs in several retrieval pairs, so a
held-out pair, clustering sample or classification query is made of names seen in training:
what the demo model learns in a couple of minutes carries over to the held-out split.

Layout: `raw/<name>.parquet` (columns query, passage, negative_1..K), `manifest.json`
(task type per dataset), `tokenizer/`, `prepared/` (the output of `tools/prepare_data.py`
with max_seq_length {max_len}). The tokenizer is a byte-level BPE trained on these texts and
on all CLDR territory, language, currency, script, month and weekday names in the
{n_langs} languages; it puts a space before a text's first word (taken off when decoding), so
a name has the same ids alone and after a query prefix. Vocab {vocab}; `<|endoftext|>` = 0
is padding, `<|im_end|>` = {eos} is EOS and is appended to every text. The held-out split is
not a separate file: the pipeline holds out a seeded share of each dataset
(data.validation_fraction, at least data.min_validation_samples rows).

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
    ap.add_argument("--output_dir", "--out", dest="output_dir",
                    default=os.path.join("mlembed_jax", "demo_data"),
                    help="where the demo data goes (--out: its old name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_seq_length", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=PAIR_ROUNDS)
    ap.add_argument("--clustering_samples", type=int, default=CLUSTERING_SAMPLES)
    for kind, n in ENTITIES.items():
        ap.add_argument(f"--{kind}", type=int, default=n, help=f"retrieval {kind} entities")
    args = ap.parse_args(argv)

    import babel

    from mlembed_jax.data.prepare import prepare_data

    rng = random.Random(args.seed)
    names = load_names()
    entities = choose_entities(names, rng, {k: getattr(args, k) for k in ENTITIES})
    plural = {"territory": "territories", "currency": "currencies"}
    counts = ", ".join(f"{len(v)} {plural.get(k, k + 's')}" for k, v in entities.items())
    datasets = {
        "cldr_names": ("retrieval", build_retrieval(entities, rng, args.rounds),
                       f"an entity ({counts}) named in language A -> the same entity named "
                       f"in language B; up to {args.rounds * len(LANGS) // 2} language pairs "
                       "per entity"),
        "cldr_kinds": ("clustering", build_clustering(entities, rng, args.clustering_samples),
                       "a name -> another name of the same kind (territory, language, "
                       "currency, script, month, weekday) in the same language"),
        "cldr_calendar": ("classification", build_classification(entities, rng),
                          "a month/weekday name in any language -> its English name"),
    }
    manifest = {"cldr_names": {"task_type": "retrieval"},
                "cldr_kinds": {"task_type": "clustering"},
                "cldr_calendar": {"task_type": "classification",
                                  "query_prefix": "calendar: "}}

    out = args.output_dir
    for sub in ("raw", "tokenizer", "prepared"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(os.path.join(out, "raw"), exist_ok=True)
    texts = []
    for name, (_, rows, _) in datasets.items():
        write_parquet(rows, os.path.join(out, "raw", f"{name}.parquet"))
        prefix = manifest[name].get("query_prefix", "")
        for r in rows:  # as prepare_data tokenises them: queries with their prefix
            texts.extend(prefix + v if k == "query" else v for k, v in r.items())
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    # The tokenizer also learns from every CLDR name of these kinds (not only the sampled
    # entities'), so it splits other text in these languages and scripts reasonably too.
    texts.extend(v for by_key in names.values() for by_lang in by_key.values()
                 for v in by_lang.values())
    tok = train_tokenizer(texts, os.path.join(out, "tokenizer"))
    prepare_data(os.path.join(out, "raw"), os.path.join(out, "manifest.json"),
                 os.path.join(out, "tokenizer"), os.path.join(out, "prepared"),
                 max_seq_length=args.max_seq_length, workers=1)
    table = "\n".join(f"| {n} | {t} | {len(rows)} | {what} |"
                      for n, (t, rows, what) in datasets.items())
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README.format(babel_version=babel.__version__, n_langs=len(LANGS),
                              n_entities=sum(len(v) for v in entities.values()),
                              n_names=len({n for v in entities.values() for e in v.values()
                                           for n in e.values()}),
                              langs=", ".join(LANGS), table=table, vocab=len(tok),
                              eos=tok.eos_token_id, max_len=args.max_seq_length))
    print(f"tokenizer: vocab {len(tok)}, eos id {tok.eos_token_id}; wrote {out}")


if __name__ == "__main__":
    main()
