"""The servers of the embedded local stack: Apache Kafka (KRaft) and Apache Cassandra 5.

Both run from the official jars fetched from Maven Central, one node each, on loopback only, with
configuration files that the stack writes into its state dir.
"""

from __future__ import annotations

import base64
import logging
import socket
import subprocess
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka.admin import AdminClient

from core.connections import cql_cluster, kafka_config
from core.settings import Settings
from pipelines.stack.errors import StackError, StackErrorCode
from pipelines.stack.maven import Artifact, Bundle
from pipelines.stack.process import marker

LOOPBACK = "127.0.0.1"
SLF4J_VERSION = "2.0.17"
LOG4J_VERSION = "2.24.3"

#: Flags Cassandra 5 needs on Java 17 (its own jvm17-server.options): module access for its
#: off-heap and reflection tricks, and the attach API for the memory meter.
CASSANDRA_JDK17_FLAGS = (
    "-Djdk.attach.allowAttachSelf=true",
    *(
        f"--add-exports={module}=ALL-UNNAMED"
        for module in (
            "java.base/jdk.internal.misc",
            "java.management.rmi/com.sun.jmx.remote.internal.rmi",
            "java.rmi/sun.rmi.registry",
            "java.rmi/sun.rmi.server",
            "java.sql/java.sql",
            "java.base/java.lang.ref",
            "jdk.unsupported/sun.misc",
            "jdk.compiler/com.sun.tools.javac.file",
            "jdk.attach/sun.tools.attach",
        )
    ),
    *(
        f"--add-opens={module}=ALL-UNNAMED"
        for module in (
            "java.base/java.lang.module",
            "java.base/jdk.internal.loader",
            "java.base/jdk.internal.ref",
            "java.base/jdk.internal.reflect",
            "java.base/jdk.internal.math",
            "java.base/jdk.internal.module",
            "java.base/jdk.internal.util.jar",
            "jdk.management/com.sun.management.internal",
            "java.base/sun.nio.ch",
            "java.base/java.io",
            "java.base/java.lang.reflect",
            "jdk.compiler/com.sun.tools.javac",
            "java.base/java.lang",
            "java.base/java.util",
        )
    ),
    "-Dio.netty.tryReflectionSetAccessible=true",
)


def loopback_port(address: str, what: str) -> int:
    """The port of ``host:port`` if host is loopback; the local stack binds nothing else."""
    host, _, port_text = address.rpartition(":")
    if "," in address or host not in {LOOPBACK, "localhost"} or not port_text.isdigit():
        raise StackError(
            StackErrorCode.BAD_ADDRESS,
            f"{what} is {address!r}; the local stack runs one node on loopback, so it must be "
            f"'127.0.0.1:<port>' (or point imstream at an external cluster and skip 'stack up')",
        )
    return int(port_text)


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``port``; SO_REUSEADDR so TIME_WAIT leftovers do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


class JavaServer(ABC):
    """One JVM server of the local stack, owning ``<state dir>/<name>/``."""

    name: str

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.stack.state_dir
        self.home = self.state_dir / self.name
        self.data_dir = self.home / "data"
        self.log_path = self.home / f"{self.name}.log"

    @property
    def marker(self) -> str:
        return marker(self.name, self.state_dir)

    @property
    @abstractmethod
    def bundle(self) -> Bundle: ...

    @abstractmethod
    def ports(self) -> dict[str, int]:
        """The ports this server binds, by role; they must be free before it starts."""

    @property
    @abstractmethod
    def endpoint(self) -> str: ...

    @abstractmethod
    def prepare(self, java: Path, classpath: str) -> None:
        """Write configuration and initialise storage before the first start."""

    @abstractmethod
    def command(self, java: Path, classpath: str) -> list[str]: ...

    def java_command(
        self,
        java: Path,
        classpath: str,
        *,
        heap: str,
        gc: Sequence[str],
        properties: Sequence[str],
        main: Sequence[str],
    ) -> list[str]:
        """The JVM line both servers share (marker, fixed heap, G1, exit on out-of-memory),
        with each server's own GC tuning, system properties and main class (and arguments)."""
        return [
            str(java),
            self.marker,
            f"-Xms{heap}",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            *gc,
            "-XX:+ExitOnOutOfMemoryError",
            *properties,
            "-cp",
            classpath,
            *main,
        ]

    @abstractmethod
    def healthy(self) -> bool:
        """A real request answered: the server is usable, not merely listening."""

    def check_ports_free(self) -> None:
        for role, port in self.ports().items():
            if not port_is_free(port):
                raise StackError(
                    StackErrorCode.PORT_IN_USE,
                    f"{self.name} cannot start: port {port} ({role}) on {LOOPBACK} is already in "
                    f"use by another process. Stop that process (e.g. `ss -ltnp 'sport = :{port}'` "
                    f"shows it) or give imstream another port in the settings",
                )


@dataclass(frozen=True)
class KafkaBrokerSecurity:
    """A secured local broker: clients on SASL_SSL (SCRAM-SHA-512) only, ACLs enforced.

    The broker's certificate and key come as one PEM file (Kafka's PEM key store), its CA as
    another (the trust store). The controller listener speaks TLS with client certificates: the
    broker presents its own and is a super user by its certificate's name (SCRAM credentials
    live in the metadata log the controller serves, so they cannot authenticate it). The SCRAM
    users are written into the storage when it is formatted, the administrator among them: it is
    the super user that talks to the broker's own SASL_SSL listener and creates the ACLs.
    """

    keystore_file: Path
    """The broker's private key and certificate chain, in one PEM file."""
    ca_file: Path
    certificate_name: str
    """The distinguished name of the broker's certificate (``CN=kafka``)."""
    admin_user: str
    admin_password: str
    users: Mapping[str, str] = field(default_factory=dict)
    """Further SCRAM-SHA-512 users, by name: one per service."""

    @property
    def super_users(self) -> str:
        return f"User:{self.admin_user};User:{self.certificate_name}"

    def server_properties(self, broker: str, controller: str) -> dict[str, str]:
        """``server.properties`` lines for a SASL_SSL listener at ``broker`` and a TLS
        controller listener at ``controller`` (``host:port``)."""
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{self.admin_user}" password="{self.admin_password}";'
        )
        return {
            "listeners": f"SASL_SSL://{broker},CONTROLLER://{controller}",
            "advertised.listeners": f"SASL_SSL://{broker}",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SSL",
            "inter.broker.listener.name": "SASL_SSL",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": jaas,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.keystore_file.resolve()),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file.resolve()),
            "ssl.protocol": "TLSv1.3",
            "ssl.enabled.protocols": "TLSv1.3",
            "listener.name.controller.ssl.client.auth": "required",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": self.super_users,
        }

    def format_arguments(self) -> list[str]:
        """``kafka-storage format`` arguments that create the SCRAM users."""
        users = {self.admin_user: self.admin_password, **self.users}
        return [
            f"--add-scram=SCRAM-SHA-512=[name={name},password={password}]"
            for name, password in users.items()
        ]


class KafkaServer(JavaServer):
    """Apache Kafka in KRaft combined mode (broker + controller in one JVM).

    The local stack's broker listens in PLAINTEXT on loopback; with ``security`` (a test's own
    broker) clients must come over SASL_SSL and the ACLs apply (:class:`KafkaBrokerSecurity`).
    """

    name = "kafka"

    def __init__(self, settings: Settings, security: KafkaBrokerSecurity | None = None) -> None:
        super().__init__(settings)
        self.security = security

    @property
    def bundle(self) -> Bundle:
        version = self.settings.stack.kafka_version
        return Bundle(
            name=self.name,
            version=version,
            artifacts=(
                Artifact("org.apache.kafka", "kafka_2.13", version),
                Artifact("org.slf4j", "slf4j-api", SLF4J_VERSION),
                Artifact("org.apache.logging.log4j", "log4j-slf4j2-impl", LOG4J_VERSION),
                Artifact("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
            ),
        )

    @property
    def broker_port(self) -> int:
        return loopback_port(self.settings.kafka.bootstrap_servers, "IM_KAFKA__BOOTSTRAP_SERVERS")

    def ports(self) -> dict[str, int]:
        return {
            "broker": self.broker_port,
            "controller": self.settings.stack.kafka_controller_port,
        }

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.broker_port}"

    def _server_properties(self) -> str:
        controller = self.settings.stack.kafka_controller_port
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{LOOPBACK}:{controller}",
            "listeners": f"PLAINTEXT://{LOOPBACK}:{self.broker_port},"
            f"CONTROLLER://{LOOPBACK}:{controller}",
            "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{self.broker_port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir.resolve()),
            **(
                self.security.server_properties(
                    f"{LOOPBACK}:{self.broker_port}", f"{LOOPBACK}:{controller}"
                )
                if self.security is not None
                else {}
            ),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "12",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "12",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        return "".join(f"{key}={value}\n" for key, value in lines.items())

    def _log4j2(self) -> str:
        return (
            "status = warn\n"
            "appender.out.type = Console\n"
            "appender.out.name = out\n"
            "appender.out.layout.type = PatternLayout\n"
            "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.out.ref = out\n"
            "logger.controller.name = org.apache.kafka.controller\n"
            "logger.controller.level = WARN\n"
        )

    def prepare(self, java: Path, classpath: str) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "server.properties").write_text(self._server_properties(), encoding="utf-8")
        (self.home / "log4j2.properties").write_text(self._log4j2(), encoding="utf-8")
        if (self.data_dir / "meta.properties").is_file():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        completed = subprocess.run(
            [
                str(java),
                f"-Dlog4j2.configurationFile={(self.home / 'log4j2.properties').resolve()}",
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                # One argument: a random id may start with "-", which would read as an option.
                f"--cluster-id={cluster_id}",
                "--config",
                str((self.home / "server.properties").resolve()),
                *(self.security.format_arguments() if self.security is not None else []),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if completed.returncode != 0:
            raise StackError(
                StackErrorCode.HEALTH_CHECK_FAILED,
                f"formatting Kafka storage in {self.data_dir} failed:\n"
                + (completed.stdout + completed.stderr).strip()[-2000:],
            )

    def command(self, java: Path, classpath: str) -> list[str]:
        return self.java_command(
            java,
            classpath,
            heap=self.settings.stack.kafka_heap,
            gc=("-XX:MaxGCPauseMillis=20",),
            properties=(
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={(self.home / 'log4j2.properties').resolve()}",
            ),
            main=("kafka.Kafka", str((self.home / "server.properties").resolve())),
        )

    def healthy(self) -> bool:
        if not port_accepts(self.broker_port):
            return False
        admin = AdminClient(kafka_config(self.settings, **{"socket.timeout.ms": 3000}))
        try:
            metadata = admin.list_topics(timeout=3)
        except Exception:  # any client error means "not answering yet"
            return False
        return bool(metadata.brokers)


#: The local Cassandra's settings for a small machine it shares with everything else (one node,
#: two cores). Measured as a whole against Cassandra 5's defaults with ``bench/cql_sink.py`` on
#: a second Cassandra: median Cassandra CPU per 1:1 message 1,000 to 1,250 µs against 1,900 to 2,500
#: (noisy on a loaded machine; docs/architecture.md, "The local stack"). Each, and why:
#:
#: - the trie memtable (Cassandra 5's newer one) as the default, its cells off heap
#:   (``offheap_objects``): fewer objects for the collector per write;
#: - ``memtable_flush_writers: 1``, ``concurrent_compactors: 1`` and ``compaction_throughput:
#:   16MiB/s``: one core's worth of background work at most, in smaller steps, so a flush or a
#:   compaction never takes both cores from the delivery path;
#: - ``hinted_handoff_enabled: false``: one node has no replica to keep hints for;
#: - ``dynamic_snitch: false``: with one replica there is nothing to rank, and its scores are
#:   recomputed every 100 ms whether busy or idle.
#:
#: Kept as they were: ``commitlog_sync: periodic`` (10 s; the sink's writes are replayable from
#: Kafka), ``trickle_fsync`` off (its default), ``concurrent_reads``/``concurrent_writes`` 8.
SMALL_BOX_YAML = """memtable:
  configurations:
    skiplist:
      class_name: SkipListMemtable
    trie:
      class_name: TrieMemtable
    default:
      inherits: trie
memtable_allocation_type: offheap_objects
memtable_flush_writers: 1
concurrent_compactors: 1
compaction_throughput: 16MiB/s
hinted_handoff_enabled: false
dynamic_snitch: false
"""
#: G1 as Cassandra's own jvm-server.options tune it: collections bounded at 300 ms rather than
#: the default 200 (fewer, larger ones: less CPU), less of each pause on remembered sets, and
#: concurrent marking from 70% of the heap rather than 45%.
SMALL_BOX_GC = (
    "-XX:MaxGCPauseMillis=300",
    "-XX:G1RSetUpdatingPauseTimePercent=5",
    "-XX:InitiatingHeapOccupancyPercent=70",
)


class CassandraServer(JavaServer):
    """Apache Cassandra 5 (the reference CQL server; ScyllaDB speaks the same protocol)."""

    name = "cassandra"

    @property
    def bundle(self) -> Bundle:
        version = self.settings.stack.cassandra_version
        server = Artifact("org.apache.cassandra", "cassandra-all", version)
        return Bundle(name=self.name, version=version, artifacts=(server,))

    @property
    def native_port(self) -> int:
        contact_points = self.settings.cql.contact_points
        if len(contact_points) != 1:
            loopback_port(",".join(contact_points), "IM_CQL__CONTACT_POINTS")
        return loopback_port(f"{contact_points[0]}:{self.settings.cql.port}", "IM_CQL__*")

    def ports(self) -> dict[str, int]:
        return {
            "native CQL": self.native_port,
            "storage": self.settings.stack.cassandra_storage_port,
            "JMX": self.settings.stack.cassandra_jmx_port,
        }

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.native_port}"

    def _cassandra_yaml(self) -> str:
        data = self.data_dir.resolve()
        storage_port = self.settings.stack.cassandra_storage_port
        return f"""cluster_name: imstream-local
num_tokens: 16
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
storage_compatibility_mode: NONE
commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_directory: {data}/commitlog
data_file_directories: [{data}/data]
saved_caches_directory: {data}/saved_caches
hints_directory: {data}/hints
cdc_raw_directory: {data}/cdc_raw
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{LOOPBACK}:{storage_port}"
listen_address: {LOOPBACK}
rpc_address: {LOOPBACK}
storage_port: {storage_port}
native_transport_port: {self.native_port}
start_native_transport: true
endpoint_snitch: SimpleSnitch
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 8
auto_snapshot: false
disk_access_mode: mmap_index_only
{SMALL_BOX_YAML}"""

    def _logback(self) -> str:
        return """<configuration scan="false">
  <appender name="OUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="OUT"/></root>
</configuration>
"""

    def prepare(self, java: Path, classpath: str) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.home / "cassandra.yaml").write_text(self._cassandra_yaml(), encoding="utf-8")
        (self.home / "logback.xml").write_text(self._logback(), encoding="utf-8")

    def command(self, java: Path, classpath: str) -> list[str]:
        return self.java_command(
            java,
            classpath,
            heap=self.settings.stack.cassandra_heap,
            gc=("-XX:+ParallelRefProcEnabled", "-XX:MaxTenuringThreshold=1", *SMALL_BOX_GC),
            properties=(
                *CASSANDRA_JDK17_FLAGS,
                f"-Dcassandra.config=file://{(self.home / 'cassandra.yaml').resolve()}",
                f"-Dlogback.configurationFile={(self.home / 'logback.xml').resolve()}",
                f"-Dcassandra.storagedir={self.data_dir.resolve()}",
                f"-Dcassandra.logdir={self.home.resolve()}",
                f"-Dcassandra.jmx.local.port={self.settings.stack.cassandra_jmx_port}",
                "-Dcassandra-foreground=yes",
                "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            ),
            main=("org.apache.cassandra.service.CassandraDaemon",),
        )

    def healthy(self) -> bool:
        if not port_accepts(self.native_port):
            return False
        cluster = cql_cluster(self.settings, connect_timeout=3)
        driver_log = logging.getLogger("cassandra")
        previous = driver_log.level
        driver_log.setLevel(logging.CRITICAL)
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local").one()
            return row is not None
        except Exception:  # any driver error means "not answering yet"
            return False
        finally:
            cluster.shutdown()
            driver_log.setLevel(previous)
