#!/usr/bin/env bash
# Copy the pilot's tables and plots (not its checkpoints) from results/ to docs/results/pilot/ with
# their provenance: the commit that produced them, the CPU, the wall time, the exact command and
# a SHA-256 per file. Run from the repository root after `make pilot` (which writes
# results/pilot_wall_s.txt); PILOT_WALL_S overrides the wall time for a run timed otherwise.
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
wall=${PILOT_WALL_S:-$(cat results/pilot_wall_s.txt 2>/dev/null || true)}
[[ -n $wall ]] || { echo "publish-pilot: no wall time: run 'make pilot' or set PILOT_WALL_S" >&2; exit 1; }
commit=$(git rev-parse HEAD)
git diff --quiet HEAD -- hpcm workflow config.yaml Snakefile || commit="$commit (with local changes)"
mkdir -p "$dest"
tmp=$(mktemp -d "$dest/.publish.XXXXXX")
trap 'rm -rf "$tmp" "$tmp.md"' EXIT
for f in "${files[@]}"; do cp "$f" "$tmp/"; done
{
  echo "# Provenance of the pilot's published tables and plots"
  echo
  echo "| | |"
  echo "|---|---|"
  echo "| command | \`$command\` (on a clean clone) |"
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
for f in "$tmp"/*; do mv "$f" "$dest/"; done
echo "published to $dest: $(ls "$dest" | wc -l) files"
