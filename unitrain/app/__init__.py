"""The application layer: recipes (:mod:`.config`), the command line (:mod:`.cli`) and
``unitrain compare`` (:mod:`.compare`)."""
