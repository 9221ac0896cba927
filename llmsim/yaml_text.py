"""Reading YAML the user wrote: YAML's safe loader, but a key written twice in one mapping is an error."""

from __future__ import annotations

import yaml


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping: plain YAML keeps the last one silently, so
    a second ``scheduler:`` section replaced the first without a word. Keys a merge (``<<: *anchor``) brings in
    may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, (str, int, float, bool)):
                    continue  # an unhashable key: the base loader says what is wrong with it
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is written twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str):
    """``yaml.safe_load`` with ``UniqueKeyLoader``."""
    return yaml.load(text, Loader=UniqueKeyLoader)
