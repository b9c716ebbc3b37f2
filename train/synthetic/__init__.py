"""The synthetic world: compositional scenes, their captions and twins (scenes.py), and an
independent reader of the captions (reader.py). Used by tools/make_shards.py and the scene oracle."""
