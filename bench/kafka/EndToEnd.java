// End-to-end latency of Apache Kafka at a steady rate, for bench/compare: one producer sends
// RATE messages per second (paced every millisecond) for SECONDS, each value stamped with its
// send time (System.nanoTime, first 8 bytes); one consumer, assigned every partition at its end
// before the first send, records receive time minus send time. Prints one JSON object:
// sent, received, seconds (first send to last receipt), measured (after warm-up), errors, latency quantiles in ms (p50, p99, p999, max, and a CDF).
//
//   java -cp 'KAFKA_LIB/*' bench/kafka/EndToEnd.java BOOTSTRAP TOPIC RATE SECONDS WARMUP SIZE [KEY=VALUE ...]
//
// Messages sent in the first WARMUP seconds are received but left out of the latencies.
// KEY=VALUE pairs are producer properties (acks=all, linger.ms=1, ...).

import java.nio.ByteBuffer;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class EndToEnd {
    public static void main(String[] args) throws Exception {
        if (args.length < 6) {
            System.err.println("usage: EndToEnd BOOTSTRAP TOPIC RATE SECONDS WARMUP SIZE [KEY=VALUE ...]");
            System.exit(2);
        }
        String bootstrap = args[0];
        String topic = args[1];
        long rate = Long.parseLong(args[2]);
        double seconds = Double.parseDouble(args[3]);
        long warmupNs = (long) (Double.parseDouble(args[4]) * 1e9);
        int size = Math.max(8, Integer.parseInt(args[5]));
        long total = (long) (rate * seconds);

        Properties cp = new Properties();
        cp.put("bootstrap.servers", bootstrap);
        cp.put("key.deserializer", ByteArrayDeserializer.class.getName());
        cp.put("value.deserializer", ByteArrayDeserializer.class.getName());
        cp.put("enable.auto.commit", "false");
        KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(cp);
        List<TopicPartition> partitions = new ArrayList<>();
        for (PartitionInfo p : consumer.partitionsFor(topic)) {
            partitions.add(new TopicPartition(topic, p.partition()));
        }
        consumer.assign(partitions);
        consumer.seekToEnd(partitions);
        for (TopicPartition tp : partitions) {
            consumer.position(tp); // resolves the end now, before the first send
        }

        Properties pp = new Properties();
        pp.put("bootstrap.servers", bootstrap);
        pp.put("key.serializer", ByteArraySerializer.class.getName());
        pp.put("value.serializer", ByteArraySerializer.class.getName());
        for (int i = 6; i < args.length; i++) {
            String[] kv = args[i].split("=", 2);
            pp.put(kv[0], kv[1]);
        }
        KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(pp);
        AtomicLong errors = new AtomicLong();
        AtomicLong sent = new AtomicLong();
        AtomicBoolean sending = new AtomicBoolean(true);
        Thread sender = new Thread(() -> {
            double perMs = rate / 1000.0;
            long started = System.nanoTime();
            // Sends stop at the deadline even when the producer fell behind the rate (send
            // waits while buffer.memory is full): what was sent is measured.
            long deadline = started + (long) (seconds * 1e9);
            long n = 0;
            while (n < total && System.nanoTime() < deadline) {
                double elapsedMs = (System.nanoTime() - started) / 1e6;
                long due = Math.min(total, (long) ((elapsedMs + 1) * perMs));
                while (n < due && System.nanoTime() < deadline) {
                    byte[] value = new byte[size];
                    ByteBuffer.wrap(value).putLong(System.nanoTime());
                    producer.send(new ProducerRecord<>(topic, value), (meta, e) -> {
                        if (e != null) {
                            errors.incrementAndGet();
                        }
                    });
                    n++;
                }
                sent.set(n);
                long next = started + (long) ((Math.floor(elapsedMs) + 1) * 1e6);
                long wait = next - System.nanoTime();
                if (wait > 0) {
                    try {
                        Thread.sleep(wait / 1_000_000, (int) (wait % 1_000_000));
                    } catch (InterruptedException e) {
                        return;
                    }
                }
            }
            producer.flush();
            sending.set(false);
        });
        sender.start();

        long started = System.nanoTime();
        long measuredFrom = started + warmupNs;
        long lastReceived = started;
        long[] micros = new long[(int) total];
        int received = 0;
        int measured = 0;
        long lastProgress = System.nanoTime();
        // Until every message sent is received, or none arrived for 10 s.
        while ((sending.get() || received < sent.get() - errors.get())
                && System.nanoTime() - lastProgress < 10_000_000_000L) {
            for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(100))) {
                long now = System.nanoTime();
                if (received < total && r.value().length >= 8) {
                    long sentAt = ByteBuffer.wrap(r.value()).getLong();
                    if (sentAt >= measuredFrom) {
                        micros[measured++] = (now - sentAt) / 1000;
                    }
                    received++;
                    lastReceived = now;
                }
                lastProgress = now;
            }
        }
        sender.join();
        producer.close();
        consumer.close();

        long[] got = Arrays.copyOf(micros, measured);
        Arrays.sort(got);
        double[] qs = {0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0};
        StringBuilder cdf = new StringBuilder();
        for (double q : qs) {
            if (cdf.length() > 0) {
                cdf.append(", ");
            }
            cdf.append(String.format("\"%s\": %.3f", q, quantile(got, q)));
        }
        System.out.printf(
                "{\"sent\": %d, \"received\": %d, \"seconds\": %.3f, \"measured\": %d, \"errors\": %d, \"p50\": %.3f, \"p99\": %.3f, "
                        + "\"p999\": %.3f, \"max\": %.3f, \"quantiles\": {%s}}%n",
                sent.get(), received, (lastReceived - started) / 1e9, measured, errors.get(), quantile(got, 0.5), quantile(got, 0.99),
                quantile(got, 0.999), quantile(got, 1.0), cdf);
    }

    /** The q-quantile of sorted microseconds, in milliseconds (nearest rank). */
    static double quantile(long[] sorted, double q) {
        if (sorted.length == 0) {
            return Double.NaN;
        }
        int i = (int) Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
        return sorted[i] / 1000.0;
    }
}
