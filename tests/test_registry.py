"""Registration fills CRSLab's real tables, is idempotent, and refuses taken names."""

from __future__ import annotations

import pytest

import lotcrs_plugin
from lotcrs_plugin import registry
from lotcrs_plugin.errors import UserError


def test_register_is_idempotent_and_fills_tables():
    lotcrs_plugin.register()
    import crslab.data

    before = dict(crslab.data.dataset_register_table)
    lotcrs_plugin.register()
    assert crslab.data.dataset_register_table == before
    assert crslab.data.dataset_register_table["synthetic"].__name__ == "SyntheticDataset"
    assert crslab.data.dataset_language_map["synthetic"] == "en"


def test_taken_name_is_refused_with_both_names():
    lotcrs_plugin.register()
    import crslab.model

    class NotKBRD:
        pass

    with pytest.raises(UserError, match=r"model 'KBRD'.*already taken by crslab\.model\.crs\.kbrd"):
        registry.register_model("KBRD", NotKBRD)
    assert crslab.model.Model_register_table["KBRD"].__name__ == "KBRDModel"


def test_same_object_twice_is_accepted():
    lotcrs_plugin.register()

    class Fresh:
        pass

    registry.register_model("lotcrs_test_fresh", Fresh)
    registry.register_model("lotcrs_test_fresh", Fresh)
    assert registry.crslab_table("model")["lotcrs_test_fresh"] is Fresh
    del registry.crslab_table("model")["lotcrs_test_fresh"]


def test_plugin_found_through_entry_point():
    names = [ep.value for ep in registry.plugin_entry_points()]
    assert "lotcrs_plugin.registry:register_builtin" in names


def test_bad_language_refused():
    lotcrs_plugin.register()
    with pytest.raises(UserError, match="language must be 'en' or 'zh'"):
        registry.register_dataset("lotcrs_test_ds", object, language="fr")


def test_paths_point_crslab_at_root(tmp_path):
    lotcrs_plugin.register()
    from lotcrs_plugin import paths
    import crslab.config
    import crslab.system.base

    layout = paths.apply_to_crslab(tmp_path / "root")
    assert crslab.config.DATASET_PATH == str(layout.dataset)
    assert crslab.system.base.SAVE_PATH == str(tmp_path / "root" / "save")
    import sys

    for name, module in sys.modules.items():
        if name.startswith("crslab") and module is not None and "DATASET_PATH" in vars(module):
            assert module.DATASET_PATH.startswith(str(tmp_path)), name


def test_class_registrar_binds_once_and_refuses_another_class_or_a_wrong_kind():
    from lotcrs_plugin.registry import RegistryError, class_registrar

    class Base:
        pass

    table: dict[str, type] = {}

    @class_registrar(table, "part", Base, "one")
    class One(Base):
        pass

    assert table == {"one": One} and One.name == "one"
    assert class_registrar(table, "part", Base, "one")(One) is One  # the same class again passes

    class Other(Base):
        pass

    with pytest.raises(RegistryError, match=r"cannot register part 'one' as .*Other: the name is already taken "
                                            r"by .*One; choose another name"):
        class_registrar(table, "part", Base, "one")(Other)
    with pytest.raises(RegistryError, match=r"part 'two': .* is not a subclass of .*Base"):
        class_registrar(table, "part", Base, "two")(int)
    assert table == {"one": One}
