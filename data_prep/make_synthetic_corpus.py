"""Writes a small, seeded, learnable synthetic German-English parallel corpus.

    python make_synthetic_corpus.py OUT_DIR [--train 4000 --valid 500 --test 500 --seed 1]

English sentences come from a small grammar (noun phrases with articles, adjectives and number,
transitive verbs in present, perfect, modal and negated forms, prepositional phrases, fronted
adverbs, "I think that ..." clauses); the German side is their rule-based translation with gender,
case and adjective inflection, verb agreement, verb-second word order after a fronted adverb and
verb-final order in perfect, modal and subordinate clauses. About 200 English and 240 German word
types; a small Transformer learns it from a few thousand pairs.

Output: OUT_DIR/{train,valid,test}.{de,en}, untokenized and true-cased (sentence-initial capital,
capitalized German nouns, final period), no pair repeated within or across splits.
"""

import argparse
import os
import random
import sys


def _table(text):
    """The rows of a table written one row a line, columns separated by spaces, as tuples."""
    return [tuple(line.split()) for line in text.strip().splitlines()]


# english singular, english plural, german singular, german plural, gender (m / f / n)
NOUNS = _table("""
    dog      dogs      Hund     Hunde    m
    cat      cats      Katze    Katzen   f
    house    houses    Haus     Häuser   n
    car      cars      Auto     Autos    n
    child    children  Kind     Kinder   n
    woman    women     Frau     Frauen   f
    man      men       Mann     Männer   m
    book     books     Buch     Bücher   n
    tree     trees     Baum     Bäume    m
    city     cities    Stadt    Städte   f
    teacher  teachers  Lehrer   Lehrer   m
    apple    apples    Apfel    Äpfel    m
    bird     birds     Vogel    Vögel    m
    door     doors     Tür      Türen    f
    table    tables    Tisch    Tische   m
    letter   letters   Brief    Briefe   m
    friend   friends   Freund   Freunde  m
    school   schools   Schule   Schulen  f
    horse    horses    Pferd    Pferde   n
    flower   flowers   Blume    Blumen   f
    window   windows   Fenster  Fenster  n
    doctor   doctors   Arzt     Ärzte    m
    girl     girls     Mädchen  Mädchen  n
    street   streets   Straße   Straßen  f
    ball     balls     Ball     Bälle    m
    picture  pictures  Bild     Bilder   n
""")
# english, german stem
ADJECTIVES = [
    ("small", "klein"), ("big", "groß"), ("red", "rot"), ("old", "alt"), ("young", "jung"),
    ("new", "neu"), ("beautiful", "schön"), ("green", "grün"), ("fast", "schnell"), ("happy", "glücklich"),
]
# english base, english 3sg, english past participle, german 3sg, german plural / infinitive, german participle
VERBS = _table("""
    see    sees     seen     sieht    sehen     gesehen
    like   likes    liked    mag      mögen     gemocht
    find   finds    found    findet   finden    gefunden
    buy    buys     bought   kauft    kaufen    gekauft
    paint  paints   painted  malt     malen     gemalt
    visit  visits   visited  besucht  besuchen  besucht
    hear   hears    heard    hört     hören     gehört
    need   needs    needed   braucht  brauchen  gebraucht
    carry  carries  carried  trägt    tragen    getragen
    wash   washes   washed   wäscht   waschen   gewaschen
""")
ADVERBS = [("today", "heute"), ("often", "oft"), ("yesterday", "gestern"), ("sometimes", "manchmal")]
PREPOSITIONS = [("in", "in"), ("with", "mit"), ("near", "bei")]

_DEFINITE = {("nom", "m"): "der", ("nom", "f"): "die", ("nom", "n"): "das", ("nom", "pl"): "die",
             ("acc", "m"): "den", ("acc", "f"): "die", ("acc", "n"): "das", ("acc", "pl"): "die",
             ("dat", "m"): "dem", ("dat", "f"): "der", ("dat", "n"): "dem"}
_INDEFINITE = {("nom", "m"): "ein", ("nom", "f"): "eine", ("nom", "n"): "ein",
               ("acc", "m"): "einen", ("acc", "f"): "eine", ("acc", "n"): "ein",
               ("dat", "m"): "einem", ("dat", "f"): "einer", ("dat", "n"): "einem"}
# adjective endings: weak (after a definite article), mixed (after ein), strong (no article)
_WEAK = {("nom", "m"): "e", ("nom", "f"): "e", ("nom", "n"): "e", ("acc", "m"): "en", ("acc", "f"): "e",
         ("acc", "n"): "e", ("dat", "m"): "en", ("dat", "f"): "en", ("dat", "n"): "en",
         ("nom", "pl"): "en", ("acc", "pl"): "en"}
_MIXED = {("nom", "m"): "er", ("nom", "f"): "e", ("nom", "n"): "es", ("acc", "m"): "en", ("acc", "f"): "e",
          ("acc", "n"): "es", ("dat", "m"): "en", ("dat", "f"): "en", ("dat", "n"): "en"}
_STRONG_PLURAL = {"nom": "e", "acc": "e"}
_CONTRACTIONS = {"in": "im", "bei": "beim"}


def noun_phrase(rng, case, allow_plural=True):
    """Returns (english words, german words, plural) of a random noun phrase in `case`."""
    en_sg, en_pl, de_sg, de_pl, gender = rng.choice(NOUNS)
    plural = allow_plural and rng.random() < 0.3
    definite = rng.random() < 0.6
    adjective = rng.choice(ADJECTIVES) if rng.random() < 0.4 else None
    key = (case, "pl" if plural else gender)
    en, de = [], []
    if plural:
        if definite:
            en.append("the")
            de.append(_DEFINITE[key])
            ending = _WEAK[key]
        else:
            ending = _STRONG_PLURAL[case]
    else:
        en.append("the" if definite else ("an" if (adjective[0] if adjective else en_sg)[0] in "aeiou" else "a"))
        de.append(_DEFINITE[key] if definite else _INDEFINITE[key])
        ending = _WEAK[key] if definite else _MIXED[key]
    if adjective:
        en.append(adjective[0])
        de.append(adjective[1] + ending)
    en.append(en_pl if plural else en_sg)
    de.append(de_pl if plural else de_sg)
    return en, de, plural


def clause(rng):
    """Returns (english words, german main-clause words, german verb-final words) of one clause."""
    subj_en, subj_de, plural = noun_phrase(rng, "nom")
    obj_en, obj_de, _ = noun_phrase(rng, "acc")
    en_base, en_3sg, en_part, de_3sg, de_pl, de_part = rng.choice(VERBS)
    de_finite = de_pl if plural else de_3sg
    pp_en, pp_de = [], []
    if rng.random() < 0.3:
        prep_en, prep_de = rng.choice(PREPOSITIONS)
        np_en, np_de, _ = noun_phrase(rng, "dat", allow_plural=False)
        if np_de[0] == "dem" and prep_de in _CONTRACTIONS:  # in dem -> im, bei dem -> beim
            pp_de = [_CONTRACTIONS[prep_de]] + np_de[1:]
        else:
            pp_de = [prep_de] + np_de
        pp_en = [prep_en] + np_en
    form = rng.random()
    if form < 0.5:  # present
        en = subj_en + [en_base if plural else en_3sg] + obj_en + pp_en
        main = subj_de + [de_finite] + obj_de + pp_de
        final = subj_de + obj_de + pp_de + [de_finite]
    elif form < 0.7:  # perfect: verb-final participle
        aux_de = "haben" if plural else "hat"
        en = subj_en + ["have" if plural else "has", en_part] + obj_en + pp_en
        main = subj_de + [aux_de] + obj_de + pp_de + [de_part]
        final = subj_de + obj_de + pp_de + [de_part, aux_de]
    elif form < 0.85:  # modal: verb-final infinitive
        modal_de = "können" if plural else "kann"
        en = subj_en + ["can", en_base] + obj_en + pp_en
        main = subj_de + [modal_de] + obj_de + pp_de + [de_pl]
        final = subj_de + obj_de + pp_de + [de_pl, modal_de]
    else:  # negation: "nicht" after the object
        en = subj_en + ["do" if plural else "does", "not", en_base] + obj_en + pp_en
        main = subj_de + [de_finite] + obj_de + ["nicht"] + pp_de
        final = subj_de + obj_de + ["nicht"] + pp_de + [de_finite]
    return en, main, final, len(subj_de)


def sentence_pair(rng):
    """Returns one (german, english) sentence pair as strings."""
    en, main, final, subj_len = clause(rng)
    r = rng.random()
    if r < 0.15:  # fronted adverb: verb second in German
        adv_en, adv_de = rng.choice(ADVERBS)
        en = [adv_en] + en
        de = [adv_de, main[subj_len]] + main[:subj_len] + main[subj_len + 1:]
    elif r < 0.27:  # subordinate clause: verb final in German
        en = ["i", "think", "that"] + en
        de = ["ich", "denke", ",", "dass"] + final
    else:
        de = main
    en = " ".join(en)
    de = " ".join(de)
    return de[0].upper() + de[1:] + " .", en[0].upper() + en[1:] + " ."


def _detokenize(text):
    return text.replace(" ,", ",").replace(" .", ".")


def generate(n_train, n_valid, n_test, seed):
    """Returns {"train": [(de, en), ...], "valid": [...], "test": [...]}, pairs unique overall."""
    rng = random.Random(seed)
    seen, splits = set(), {}
    for name, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        pairs = []
        attempts = 0
        while len(pairs) < n:
            attempts += 1
            if attempts > 100 * (n + 10):
                raise ValueError(f"cannot draw {n} distinct {name} pairs: ask for fewer pairs")
            de, en = sentence_pair(rng)
            if (de, en) in seen:
                continue
            seen.add((de, en))
            pairs.append((_detokenize(de), _detokenize(en)))
        splits[name] = pairs
    return splits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--valid", type=int, default=500)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    for name in ("train", "valid", "test"):
        if getattr(args, name) < 0:
            sys.exit(f"make_synthetic_corpus.py: error: --{name} must be >= 0, got {getattr(args, name)}")
    try:
        splits = generate(args.train, args.valid, args.test, args.seed)
    except ValueError as e:
        sys.exit(f"make_synthetic_corpus.py: error: {e}")
    os.makedirs(args.out_dir, exist_ok=True)
    for name, pairs in splits.items():
        for lang, column in (("de", 0), ("en", 1)):
            path = os.path.join(args.out_dir, f"{name}.{lang}")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(pair[column] + "\n" for pair in pairs)
            os.replace(path + ".tmp", path)
    print(f"wrote {args.train} / {args.valid} / {args.test} train / valid / test pairs to {args.out_dir}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
