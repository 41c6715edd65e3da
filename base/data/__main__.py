"""`python -m codegpt.base.data recipe.yaml [data.key=value ...]`: build a recipe's token shards."""

from codegpt.base.data.build import main

main()
