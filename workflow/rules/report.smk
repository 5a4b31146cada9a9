# Tables and plots for the HTML report (`snakemake --report results/report.html`).
