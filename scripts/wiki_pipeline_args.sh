# Sourced by the Wikipedia pipeline scripts (reproduce_cpu.sh, seed_rows_study.sh): their --smoke flag, PYTHON, and the
# data mirror (SHARED_DATA_DIR; --smoke defaults to tests/data) with its Wikipedia folder WIKI.
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    *) echo "error: unknown argument $arg (only --smoke)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python}
SHARED=${SHARED_DATA_DIR:-}
[ -n "$SHARED" ] || [ "$SMOKE" = 0 ] || SHARED=tests/data
[ -n "$SHARED" ] || { echo "error: set SHARED_DATA_DIR to the folder holding corpus_wikipedia_en/ and the evaluation files" >&2; exit 2; }
WIKI="$SHARED/corpus_wikipedia_en/AA"
[ -d "$WIKI" ] || { echo "error: $WIKI not found; set SHARED_DATA_DIR to the folder holding corpus_wikipedia_en" >&2; exit 2; }
