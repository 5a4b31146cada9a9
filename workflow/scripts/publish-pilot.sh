#!/usr/bin/env bash
# Copy the pilot's tables and plots (not its checkpoints) from results/ to docs/results/pilot/ with
# their provenance: the commit that ran them, the CPU, the wall time, the exact command and a
# SHA-256 per file. Run from the repository root after `make pilot`, which records the commit and
# the wall time in results/pilot_run.txt; PILOT_COMMIT and PILOT_WALL_S stand in for a run
# started otherwise. The destination is replaced as a whole.
set -euo pipefail
dest=${1:-docs/results/pilot}
command="snakemake --configfile workflow/configs/pilot.yaml --cores 2"
files=(
  results/tables/bd_seeds_vs_baseline.{csv,md}
  results/tables/convergence.{csv,md}
  results/tables/bd_vs_baseline.{csv,md}
  results/tables/summary.{csv,md}
  results/plots/convergence.png
  results/rd/points.csv
  results/rd/images.csv
)
for f in "${files[@]}"; do
  [[ -f $f ]] || { echo "publish-pilot: $f is missing: run '$command' first" >&2; exit 1; }
done
# the PSNR figures of every test set; a forest plot exists only where some BD-rate does
shopt -s nullglob
files+=(results/plots/rd/rd_*_psnr.png results/plots/delta/delta_*_psnr.png
        results/plots/forest/forest_*_psnr.png)
recorded() { [[ ! -f results/pilot_run.txt ]] || sed -n "s/^$1=//p" results/pilot_run.txt; }
wall=${PILOT_WALL_S:-$(recorded wall_s)}
commit=${PILOT_COMMIT:-$(recorded commit)}
[[ -n $wall && -n $commit ]] || {
  echo "publish-pilot: results/pilot_run.txt is missing: run 'make pilot' (or set PILOT_COMMIT and PILOT_WALL_S)" >&2
  exit 1
}
mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d "$(dirname "$dest")/.publish.XXXXXX")
trap 'rm -rf "$tmp" "$tmp.md" "$dest.old"' EXIT
for f in "${files[@]}"; do cp "$f" "$tmp/"; done
{
  echo "# Provenance of the pilot's published tables and plots"
  echo
  echo "| | |"
  echo "|---|---|"
  echo "| command | \`$command\` |"
  echo "| commit | $commit |"
  echo "| CPU | $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, torch capability $(python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())') |"
  echo "| wall time | $((wall / 60)) min $((wall % 60)) s |"
  echo "| published | $(date -u +%Y-%m-%dT%H:%MZ) |"
  echo
  echo "Regenerate the tables and plots from the same runs: delete them and run the command again"
  echo "(Snakemake redoes only the analysis); their SHA-256 must equal these:"
  echo
  echo '```'
  (cd "$tmp" && sha256sum -- *)
  echo '```'
} > "$tmp.md"
mv "$tmp.md" "$tmp/PROVENANCE.md"
rm -rf "$dest.old"
[[ ! -e $dest ]] || mv "$dest" "$dest.old"
mv "$tmp" "$dest"
echo "published to $dest: $(ls "$dest" | wc -l) files"
