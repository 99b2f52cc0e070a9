// Connection churn: every request opens a new TCP connection (noConnectionReuse), so the
// request rate is the rate of new connections through the service.
//   k6 run -e TARGET=http://10.96.0.10 -e VUS=16 -e DURATION=30s bench/k6/churn.js
import http from 'k6/http';
import { check } from 'k6';

export const options = {
  noConnectionReuse: true,
  scenarios: {
    churn: { executor: 'constant-vus', vus: Number(__ENV.VUS || 16), duration: __ENV.DURATION || '10s' },
  },
  summaryTrendStats: ['med', 'p(90)', 'p(99)', 'max'],
  thresholds: { checks: ['rate>0.99'] },
};

export default function () {
  const res = http.get(`${__ENV.TARGET}/`, { timeout: '2s' });
  check(res, { 'status is 200': (r) => r.status === 200 });
}
