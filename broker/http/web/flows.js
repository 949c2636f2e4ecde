// Allocation arcs drawn on a canvas between the map's base layer and its hub cards.
// A canvas, not SVG elements: a hundred arcs a second would otherwise repaint the whole map every
// frame; here one frame is a clear and a few hundred short line segments.

const LIFE_MS = 2200;
const DRAW_MS = 750; // the head travels origin -> site in this time, then the arc fades
const MAX_ARCS = 160;
const SEGMENTS = 18;

export class Flows {
  /** canvas overlays an SVG whose viewBox is `width` x `height` (preserveAspectRatio meet). */
  constructor(canvas, width, height) {
    this.canvas = canvas;
    this.ctx = canvas.getContext('2d');
    this.vw = width;
    this.vh = height;
    this.arcs = [];
    this.drawn = 0;
    this.running = false;
    this.frame = this.frame.bind(this);
    new ResizeObserver(() => this.resize()).observe(canvas);
    this.resize();
  }

  resize() {
    const ratio = window.devicePixelRatio || 1;
    const { clientWidth: w, clientHeight: h } = this.canvas;
    this.canvas.width = Math.max(1, Math.round(w * ratio));
    this.canvas.height = Math.max(1, Math.round(h * ratio));
    const scale = Math.min(w / this.vw, h / this.vh);
    // the same mapping the SVG applies to its viewBox, times the device pixel ratio
    this.transform = [scale * ratio, ((w - this.vw * scale) / 2) * ratio, ((h - this.vh * scale) / 2) * ratio];
  }

  /** One allocation from (x1, y1) to (x2, y2) in map units. */
  add(x1, y1, x2, y2, colour) {
    const dx = x2 - x1;
    const dy = y2 - y1;
    const bend = 0.28; // bow to the left of the direction of travel, lifted a little
    this.arcs.push({ x1, y1, x2, y2, cx: (x1 + x2) / 2 + dy * bend, cy: (y1 + y2) / 2 - Math.abs(dx) * bend - 6,
      colour, born: performance.now() });
    if (this.arcs.length > MAX_ARCS) this.arcs.splice(0, this.arcs.length - MAX_ARCS);
    this.drawn += 1;
    this.canvas.dataset.drawn = this.drawn;
    if (!this.running) {
      this.running = true;
      requestAnimationFrame(this.frame);
    }
  }

  frame(now) {
    const { ctx } = this;
    const [scale, ox, oy] = this.transform;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    ctx.setTransform(scale, 0, 0, scale, ox, oy);
    ctx.lineCap = 'round';
    this.arcs = this.arcs.filter((a) => now - a.born < LIFE_MS);
    for (const a of this.arcs) {
      const age = Math.max(0, now - a.born);
      const reach = Math.min(1, age / DRAW_MS);
      const fade = age < DRAW_MS ? 1 : 1 - (age - DRAW_MS) / (LIFE_MS - DRAW_MS);
      ctx.globalAlpha = Math.max(0, fade) * 0.9;
      ctx.strokeStyle = a.colour;
      ctx.fillStyle = a.colour;
      ctx.lineWidth = 1.6;
      ctx.beginPath();
      ctx.moveTo(a.x1, a.y1);
      const steps = Math.max(1, Math.ceil(SEGMENTS * reach));
      let x = a.x1;
      let y = a.y1;
      for (let i = 1; i <= steps; i++) {
        const t = (reach * i) / steps;
        const u = 1 - t;
        x = u * u * a.x1 + 2 * u * t * a.cx + t * t * a.x2;
        y = u * u * a.y1 + 2 * u * t * a.cy + t * t * a.y2;
        ctx.lineTo(x, y);
      }
      ctx.stroke();
      ctx.beginPath();
      if (reach < 1) {
        ctx.arc(x, y, 2.6, 0, Math.PI * 2); // the head, on its way
        ctx.fill();
      } else {
        ctx.lineWidth = 1.2; // landed: a ring that widens as it fades
        ctx.arc(a.x2, a.y2, 4 + 10 * (1 - fade), 0, Math.PI * 2);
        ctx.stroke();
      }
    }
    ctx.globalAlpha = 1;
    this.canvas.dataset.active = this.arcs.length;
    if (this.arcs.length) {
      requestAnimationFrame(this.frame);
    } else {
      this.running = false;
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    }
  }
}
