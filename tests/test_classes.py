import pytest

from proxyclip import ClassList, make_class_list, parse_classes, read_class_file
from proxyclip.errors import ClassNamesError


def test_parse_commas_and_synonyms():
    classes = parse_classes("cat; kitten, dog ,  grass,sky")
    assert classes.names == (("cat", "kitten"), ("dog",), ("grass",), ("sky",))
    assert classes.queries == ("cat", "kitten", "dog", "grass", "sky")
    assert classes.display_names == ("cat", "dog", "grass", "sky")


def test_sequences_of_synonyms_and_whitespace():
    classes = make_class_list(["person;  people ", ["tv monitor", "screen"], "  potted   plant"])
    assert classes.names == (("person", "people"), ("tv monitor", "screen"), ("potted plant",))
    assert make_class_list(classes) is classes


@pytest.mark.parametrize("text", ["", "   ", "cat,,dog", "cat, ", "cat; , dog", ";"])
def test_empty_names_are_rejected(text):
    with pytest.raises(ClassNamesError):
        parse_classes(text)


@pytest.mark.parametrize("items", [["cat", "cat"], ["cat; Cat"], ["dog", "puppy; DOG"]])
def test_duplicates_are_rejected(items):
    with pytest.raises(ClassNamesError, match="twice"):
        make_class_list(items)


def test_a_plain_string_is_not_a_list():
    with pytest.raises(ClassNamesError):
        make_class_list("cat, dog")
    with pytest.raises(ClassNamesError):
        make_class_list([])


def test_class_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("background; sky; wall\naeroplane\n\nship\n", encoding="utf-8")
    classes = read_class_file(path)
    assert isinstance(classes, ClassList)
    assert classes.names == (("background", "sky", "wall"), ("aeroplane",), ("ship",))


def test_class_file_errors(tmp_path):
    with pytest.raises(ClassNamesError, match="cannot read"):
        read_class_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ClassNamesError, match="empty"):
        read_class_file(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ClassNamesError):
        read_class_file(tmp_path / "bin.txt")
