# Source from the repository root on a machine that cannot build packages (no network for
# pip's build step): lays the three folders out as the installed `sparsejax` package would.
site=/tmp/sparsejax_site
rm -rf "$site" && mkdir -p "$site"
cp -r sparsejax "$site/sparsejax"
cp -r compiler "$site/sparsejax/compiler"
cp -r models "$site/sparsejax/models"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
