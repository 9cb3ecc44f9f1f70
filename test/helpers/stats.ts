// Chi-square tests for the sampling-exactness checks.

/** ln Gamma(x) (Lanczos, |error| < 2e-10 for x > 0). */
function logGamma(x: number): number {
  const coefficients = [
    76.18009172947146, -86.50532032941678, 24.01409824083091, -1.231739572450155, 0.1208650973866179e-2,
    -0.5395239384953e-5,
  ];
  let y = x;
  const tmp = x + 5.5 - (x + 0.5) * Math.log(x + 5.5);
  let series = 1.000000000190015;
  for (const c of coefficients) series += c / ++y;
  return -tmp + Math.log((2.5066282746310007 * series) / x);
}

/** Regularized upper incomplete gamma Q(a, x) (Numerical Recipes: series below a + 1, else continued fraction). */
function upperGammaQ(a: number, x: number): number {
  if (x <= 0) return 1;
  const logPrefix = -x + a * Math.log(x) - logGamma(a);
  if (x < a + 1) {
    let term = 1 / a;
    let sum = term;
    for (let n = 1; n < 10_000; n++) {
      term *= x / (a + n);
      sum += term;
      if (Math.abs(term) < Math.abs(sum) * 1e-15) break;
    }
    return 1 - sum * Math.exp(logPrefix);
  }
  const tiny = 1e-300;
  let b = x + 1 - a;
  let c = 1 / tiny;
  let d = 1 / b;
  let h = d;
  for (let i = 1; i < 10_000; i++) {
    const an = -i * (i - a);
    b += 2;
    d = an * d + b;
    if (Math.abs(d) < tiny) d = tiny;
    c = b + an / c;
    if (Math.abs(c) < tiny) c = tiny;
    d = 1 / d;
    const delta = d * c;
    h *= delta;
    if (Math.abs(delta - 1) < 1e-15) break;
  }
  return Math.exp(logPrefix) * h;
}

/** P(X >= statistic) for X ~ chi-square with `degrees` degrees of freedom. */
export function chiSquarePValue(statistic: number, degrees: number): number {
  return upperGammaQ(degrees / 2, statistic / 2);
}

export interface ChiSquareResult {
  statistic: number;
  degrees: number;
  pValue: number;
  bins: number;
}

const MIN_EXPECTED = 5;

/**
 * Goodness of fit of observed category counts to exact probabilities. Categories expected fewer than 5
 * times are pooled into one bin (observations outside `probabilities` land there too).
 */
export function chiSquareGoodnessOfFit(
  observed: Map<string, number>,
  probabilities: Map<string, number>,
): ChiSquareResult {
  let total = 0;
  for (const count of observed.values()) total += count;
  let statistic = 0;
  let bins = 0;
  let pooledExpected = 0;
  let pooledObserved = 0;
  for (const [category, probability] of probabilities) {
    const expected = total * probability;
    const count = observed.get(category) ?? 0;
    if (expected >= MIN_EXPECTED) {
      statistic += (count - expected) ** 2 / expected;
      bins += 1;
    } else {
      pooledExpected += expected;
      pooledObserved += count;
    }
  }
  for (const [category, count] of observed) if (!probabilities.has(category)) pooledObserved += count;
  if (pooledExpected > 0) {
    statistic += (pooledObserved - pooledExpected) ** 2 / pooledExpected;
    bins += 1;
  } else if (pooledObserved > 0) {
    // Observations where the distribution puts no mass at all: impossible under the hypothesis.
    return { statistic: Infinity, degrees: Math.max(1, bins - 1), pValue: 0, bins };
  }
  const degrees = Math.max(1, bins - 1);
  return { statistic, degrees, pValue: chiSquarePValue(statistic, degrees), bins };
}

/** Whether two samples come from one distribution (chi-square test of homogeneity, sparse bins pooled). */
export function chiSquareHomogeneity(
  first: Map<string, number>,
  second: Map<string, number>,
): ChiSquareResult {
  const n1 = [...first.values()].reduce((a, b) => a + b, 0);
  const n2 = [...second.values()].reduce((a, b) => a + b, 0);
  const categories = new Set([...first.keys(), ...second.keys()]);
  const cells: [number, number][] = [];
  let pooled: [number, number] = [0, 0];
  for (const category of categories) {
    const a = first.get(category) ?? 0;
    const b = second.get(category) ?? 0;
    const combined = a + b;
    if ((combined * Math.min(n1, n2)) / (n1 + n2) >= MIN_EXPECTED) cells.push([a, b]);
    else pooled = [pooled[0] + a, pooled[1] + b];
  }
  if (pooled[0] + pooled[1] > 0) cells.push(pooled);
  let statistic = 0;
  for (const [a, b] of cells) {
    const combined = a + b;
    const expectedA = (combined * n1) / (n1 + n2);
    const expectedB = (combined * n2) / (n1 + n2);
    statistic += (a - expectedA) ** 2 / expectedA + (b - expectedB) ** 2 / expectedB;
  }
  const degrees = Math.max(1, cells.length - 1);
  return { statistic, degrees, pValue: chiSquarePValue(statistic, degrees), bins: cells.length };
}

export function countCategories(samples: string[]): Map<string, number> {
  const counts = new Map<string, number>();
  for (const sample of samples) counts.set(sample, (counts.get(sample) ?? 0) + 1);
  return counts;
}
