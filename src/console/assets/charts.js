// Small live charts drawn as SVG polylines by hand: the last POINTS samples of each series.

const SVG = 'http://www.w3.org/2000/svg';
/** Samples kept per series (at one sample per 2 s: two minutes). */
export const POINTS = 60;

/** A chart of one or more series in the `svg` element (viewBox 300×80). */
export class LineChart {
  constructor(svg, colors) {
    this.svg = svg;
    this.series = colors.map(() => []);
    this.lines = colors.map((color) => {
      const line = document.createElementNS(SVG, 'polyline');
      line.setAttribute('fill', 'none');
      line.setAttribute('stroke', color);
      line.setAttribute('stroke-width', '1.5');
      line.setAttribute('vector-effect', 'non-scaling-stroke');
      svg.append(line);
      return line;
    });
  }

  clear() {
    for (const s of this.series) s.length = 0;
    this.draw();
  }

  /** Appends one sample per series and redraws. */
  push(values) {
    values.forEach((v, i) => {
      const s = this.series[i];
      s.push(Number.isFinite(v) ? Math.max(0, v) : 0);
      if (s.length > POINTS) s.shift();
    });
    this.draw();
  }

  draw() {
    const max = Math.max(1, ...this.series.flat());
    this.series.forEach((s, i) => {
      const points = s.map((v, j) => {
        const x = (300 * (j + POINTS - s.length)) / (POINTS - 1);
        const y = 78 - (74 * v) / max;
        return `${x.toFixed(1)},${y.toFixed(1)}`;
      });
      this.lines[i].setAttribute('points', points.join(' '));
    });
  }
}
