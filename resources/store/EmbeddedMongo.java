// Single-file launcher for the embedded MongoDB-wire store (mongo-java-server 1.47.0, H2 MVStore backend).
// Run: java [-Dstore.cacheMb=512] -cp '<jars>/*' EmbeddedMongo.java <host> <port> <file.mv | :memory:>
// store.cacheMb: the H2 MVStore page cache in MB (H2's own default is 16 MB). Queries the server cannot
// answer from a unique index scan the whole collection, and with a cache smaller than the collection
// every scan reads and decodes its pages again; capped at half the JVM's maximum heap.
// Announces MongoDB 5.0.0 / wire version 13 so pymongo 4.x accepts the server (see shared store.md).
// Prints "READY <host>:<port> cache <MB> MB" (the page cache in effect) on stdout once it accepts connections; exits when stdin closes or on SIGTERM.
import de.bwaldvogel.mongo.MongoServer;
import de.bwaldvogel.mongo.MongoVersion;
import de.bwaldvogel.mongo.backend.AbstractMongoBackend;
import de.bwaldvogel.mongo.backend.h2.H2Backend;
import java.util.List;
import org.h2.mvstore.MVStore;

public class EmbeddedMongo {
    static final MongoVersion MONGO_5_0_WIRE_13 = new MongoVersion() {
        public List<Integer> getVersionArray() { return List.of(5, 0, 0); }
        public int getWireVersion() { return 13; }
    };

    public static void main(String[] args) throws Exception {
        String host = args.length > 0 ? args[0] : "127.0.0.1";
        int port = args.length > 1 ? Integer.parseInt(args[1]) : 27017;
        String file = args.length > 2 ? args[2] : ":memory:";
        long maxHeapMb = Runtime.getRuntime().maxMemory() / (1024 * 1024);
        int cacheMb = (int) Math.max(16, Math.min(Long.getLong("store.cacheMb", 16), maxHeapMb / 2));
        H2Backend backend = ":memory:".equals(file)
            ? H2Backend.inMemory()
            : new H2Backend(new MVStore.Builder().fileName(file).cacheSize(cacheMb).open());
        backend.version(MONGO_5_0_WIRE_13);
        System.err.println("[store] H2 MVStore page cache " + cacheMb + " MB (JVM max heap " + maxHeapMb + " MB)");
        MongoServer server = new MongoServer(backend);
        server.bind(host, port);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            server.shutdown();
            backend.close();
        }));
        System.out.println("READY " + host + ":" + port + " cache " + cacheMb + " MB");
        System.out.flush();
        // Exit when the parent closes our stdin (it died or asked us to stop).
        boolean watchStdin = args.length <= 3 || !"--no-stdin-watch".equals(args[3]);
        if (watchStdin) {
            while (System.in.read() != -1) { }
            System.exit(0);
        } else {
            Thread.currentThread().join();
        }
    }
}
